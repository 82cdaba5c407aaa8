"""Memory accounting and benchmarking (``lla-bench``, ``make bench``; issue 7).

* :mod:`lla.bench.memory`: saved-tensor and gradient meters (device-independent bytes, per-module segments);
* :mod:`lla.bench.accounting`: parameters + gradients + optimizer state + activations, and the lower bound;
* :mod:`lla.bench.runner`: one configuration through the real engine and a Lightning Trainer;
* :mod:`lla.bench.targets`: the reference implementations' figures, as data;
* :mod:`lla.bench.suites`, :mod:`lla.bench.report`, :mod:`lla.bench.cli`: what ``make bench`` runs and writes;
* :mod:`lla.bench.gpu`: ``make gpu-check`` (the ``gpu`` tests and a small benchmark on one CUDA GPU).
"""
