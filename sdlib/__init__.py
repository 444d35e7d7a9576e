"""sdlib: companion library to Borup & Andersen, *Even your Teacher Needs Guidance* (NeurIPS 2021).

- :mod:`sdlib.krr`   self-distillation in kernel ridge regression, in closed form.
- :mod:`sdlib.alpha` the least-squares estimate of the mixing weight alpha (Algorithm 1).

The deep-network modules import torch lazily; the theory needs only numpy and scipy.
"""

__version__ = "0.1.0"
