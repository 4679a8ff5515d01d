"""rlhf_engine's test suite. A regular package, so `tests.<module>` imports resolve here even
when an installed distribution (verl 0.9.1 does) ships a top-level `tests` package."""
