"""gradstudy: how optimizers deal with gradient noise, studied with Ray Tune and MLflow."""
__version__ = "0.1.0"
