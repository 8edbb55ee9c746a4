"""kernelgen client: generate SIREN convolution kernels on a remote kernelgen server."""

__version__ = "0.1.0"
