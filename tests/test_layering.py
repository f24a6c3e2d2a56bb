"""The package's layering: configs validate without jax, registries agree with their modules,
and lower layers never import higher ones (checked on the source's import statements)."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from codescaler_jax import registry

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "codescaler_jax"


def test_grpo_config_validates_without_jax_or_flax():
    code = (
        "import json, sys\n"
        "from codescaler_jax.config import load_config\n"
        "from codescaler_jax.rl.config import GRPOConfig\n"
        "cfg = load_config(GRPOConfig, 'configs/grpo_tiny.yaml')\n"
        "cfg.algorithm.loss_config()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax'))\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_bad_name_is_refused_without_jax():
    code = (
        "import sys\n"
        "from codescaler_jax.config import ConfigError, load_config\n"
        "from codescaler_jax.rl.config import GRPOConfig\n"
        "for key in ('algorithm.estimator', 'reward.name', 'reward.shaping', "
        "'algorithm.loss_agg_mode', 'algorithm.kl_estimator', 'rollout.engine'):\n"
        "    try:\n"
        "        load_config(GRPOConfig, 'configs/grpo_tiny.yaml', [key + '=nope'])\n"
        "    except (ConfigError, ValueError) as e:\n"
        "        assert 'nope' in str(e), (key, e)\n"
        "    else:\n"
        "        raise SystemExit(key + ' accepted')\n"
        "assert 'jax' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("reg", registry.ALL, ids=lambda r: r.kind)
def test_declared_names_are_what_the_home_module_registers(reg):
    for home in reg.homes:
        importlib.import_module(home)
    builtins = {n for n, fn in reg.registered().items()
                if getattr(fn, "__module__", None) in reg.homes}
    assert builtins == set(reg.declared)
    assert reg.get(reg.declared[0]) is reg.registered()[reg.declared[0]]


def _imports(path: Path) -> set[str]:
    """Absolute names of the codescaler_jax modules ``path`` imports (anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("codescaler_jax")}


def _modules(*parts: str) -> list[Path]:
    return [p for part in parts for p in sorted((PKG / part).rglob("*.py"))
            if p.name != "__init__.py"] if parts else []


def test_lower_layers_do_not_import_higher_ones():
    rules = {
        # generation and evaluation sit below the trainers
        ("generate", "eval"): ("codescaler_jax.rl", "codescaler_jax.rm.trainer"),
        # shared training parts know neither trainer's own modules
        ("training",): ("codescaler_jax.rl", "codescaler_jax.rm"),
        ("models", "data", "code"): ("codescaler_jax.rl", "codescaler_jax.rm",
                                     "codescaler_jax.training", "codescaler_jax.serving"),
    }
    bad = []
    for folders, banned in rules.items():
        for path in _modules(*folders):
            bad += [f"{path.relative_to(ROOT)} imports {m}" for m in _imports(path)
                    if m.startswith(banned)]
    assert bad == []


def test_inference_never_imports_a_trainer():
    paths = [PKG / "rm" / "scorer.py", PKG / "rl" / "rewards.py", PKG / "best_of_n.py",
             PKG / "score.py", *_modules("serving")]
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in paths for m in _imports(p)
           if m in ("codescaler_jax.rm.trainer", "codescaler_jax.rl.trainer")]
    assert bad == []
