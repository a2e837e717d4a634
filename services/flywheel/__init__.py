"""Flywheel: online RLHF as a gRPC microservice cluster.

Kept free of heavy imports: the SDK imports the generated ``flywheel.v1`` modules
from this package without the server extras installed.
"""

__version__ = "0.1.0"
