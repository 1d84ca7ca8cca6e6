"""Analysis: MLflow runs -> pandas (`runs`), tables with provenance (`tables`), figures (`figures`).

The notebooks in analysis/ are thin views over these modules; `pha-lab tables` (`make tables`)
executes them headlessly into analysis/out/. Nothing here imports torch or lightning.
"""
