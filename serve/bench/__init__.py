"""`stoker bench`: a load generator for any OpenAI-compatible server with Etalon's user-experience metrics
(TTFT, TBT, fluidity-index, fluid token generation rate), plots and capacity search.

workload.py (arrivals, lengths) -> prompts.py (exact token counts) -> client.py (streaming, token times)
-> metrics.py (pure functions) / analysis.py (SLO, rows, summary) -> report.py + plots.py; capacity.py
searches the rate; run.py ties them together; flags.py is the command line.
"""
