"""AnomalousPatchCore (APC) for anomalib.

Kept free of imports on purpose: the start-up hook (``_autoload``) imports this package in every
Python process of the environment, so anything heavy belongs in the sub-packages.
"""

__version__ = "0.1.0"
