"""Study results -> tables and figures: reads what a sweep records (MLflow or Ray Tune results),
never the training code, so reports can be made anywhere the store is reachable."""
from analysis.load import StudyNotFoundError, load_mlflow, load_tune

__all__ = ["StudyNotFoundError", "load_mlflow", "load_tune"]
