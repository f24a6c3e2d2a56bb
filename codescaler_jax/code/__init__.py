"""Host-side code handling: fenced-block extraction, syntax validity, the execution sandbox."""
