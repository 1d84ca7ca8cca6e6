"""Benchmarks: throughput, memory and MFU vs context length (`pha-lab bench`), the GPT-2 reference loops
(124M and mini), and the Lightning-vs-plain-loop overhead check. See docs/perf-notes.md.

Modules, in import order: each imports only from those listed before it (tests/test_imports.py checks it):
  timing          the one timing loop (CUDA events / perf_counter), step functions, percentiles, autocast,
                  memory freeing, `measure` (a result row, OOM and errors recorded); no pha_lab imports
  spec            the bench YAML's schema (dataclasses), `load_spec`, the cells of each part (`plan`)
  gpt2_reference  the plain nanoGPT-style loop the suite is compared with
  dss_variants    the DSS long convolution's implementations (before the GSS rewrite, the model's fft and chunked)
  workloads       workload name -> module, batches, loss, optimizer, sizes, FLOPs
  traffic         eager bytes moved per op on the meta device: the predictions in docs/perf-notes.md
  roofline        matmul peak, copy bandwidth, analytic floors, MFU
  report          CSV, header JSON, printed table and comparisons, MLflow run
  overhead        the plain-loop vs Lightning-loop part (the only one importing Lightning)
  decode          the decode part: prefill, then one token at a time from the model's decoding state, by context x
                  batch; the state's bytes against the analytic cache
  profile         a kernel-class table per workload from torch.profiler (`python -m pha_lab.bench.profile`; not a
                  `pha-lab bench` part)
  efficiency      runs a spec: plan the cells, run each, collect rows (`pha-lab bench`)
  loss            the LM head + loss alone, plain vs chunked (`python -m pha_lab.bench.loss`; not a `pha-lab
                  bench` part)
"""
