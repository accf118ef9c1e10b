"""The evaluation stage: retrieval and captioning on a held-out set, and, on the synthetic
world, how well the filter found the web noise and how often the captioner was right.

- `config`: `EvalConfig`, and which settings change the numbers.
- `testset`: the held-out images and captions (`read_test_set`).
- `model_inputs`: images and texts as tensors on the model's device.
- `retrieval`: ITC rank + ITM re-rank, R@1/5/10 by image id and by scene; `pair_itc_scores`.
- `captioning`: generated captions, BLEU-4 / CIDEr and scene correctness.
- `truth_checks`: filter noise detection and captioner correctness against the world's truth.
- `metrics`: the metric functions themselves (pure, over arrays and strings).
- `result`: `EvalResult` and its JSON.
- `measure`: `evaluate` (a model on a test set; writes nothing).
- `run`: `evaluate_to_file`, `evaluate_run_folder`, `evaluate_run` (write ``eval/metrics.json``, rerun-safe).
"""
