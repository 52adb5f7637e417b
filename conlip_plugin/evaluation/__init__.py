"""Evaluating trained models: the heads' attention (paper Table 2), per-query ranks, the demo's report."""
