"""fashion-gan: a DCGAN training job for fashion images and a FloydHub-style job runner."""

__version__ = "0.1.0"
