"""mtl: multi-task face-attribute training for the mask-status competition; `Predictor` answers for any photos."""


def __getattr__(name):
    # NOTE: imported on first use, so `import mtl.labels` stays light (no torch, pandas or timm)
    if name == "Predictor":
        from mtl.predictor import Predictor
        return Predictor
    raise AttributeError(f"module 'mtl' has no attribute {name!r}")


__all__ = ["Predictor"]
