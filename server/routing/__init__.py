"""Where each batch runs: a cost model per model and device, which executors each model may use
(decided at start-up), the pure choice of executor per batch, the router that applies it, the
start-up calibration and its cache."""
