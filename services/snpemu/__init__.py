"""snpemu: a virtual AMD SEV-SNP host whose parts run as separate gRPC services."""

__version__ = "0.1.0"
