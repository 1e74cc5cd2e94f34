"""mlci: keep ONNX models fast and portable across compilers and hardware, in CI."""

__version__ = "0.1.0"
