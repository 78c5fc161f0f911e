"""Image subtraction: the PSF-matching kernel, the difference and its decorrelation."""

from apdask.pipeline.subtract.decorrelate import decorrelation_kernel
from apdask.pipeline.subtract.difference import subtract
from apdask.pipeline.subtract.kernel import alard_lupton_basis, choose_kernel_size

__all__ = ["alard_lupton_basis", "choose_kernel_size", "decorrelation_kernel", "subtract"]
