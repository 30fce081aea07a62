"""broadface: BroadFace training for face recognition and deep metric learning."""
__version__ = "0.1.0"
