"""Evaluation of pico models.

- `perplexity`: perplexity as the published pico models report it (pico-lm/perplexity semantics), shared by
  the training callback and `eval/run.py --paloma`; the standalone `evaluate` metric in
  `eval/metrics/perplexity` computes the same values without importing pico_hf.
- `harness`: lm-evaluation-harness on pico checkpoints (task resolution, model loading, reports); the
  command line is `eval/run.py`, the task configs and their data ship in `tasks/` and `data/` (`tasks_dir`).
- `callback`: evaluation at every checkpoint of a training run (`runs/<run>/eval_results/step_N.json`);
  `results` reads those files back as series by step (the study and analysis reports).
"""
