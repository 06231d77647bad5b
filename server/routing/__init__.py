"""Where each batch runs: a cost model per model and device, the pure choice of executor, the
router that applies it, the start-up calibration and its cache."""
