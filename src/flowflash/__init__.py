"""flowflash: few-step rectified-flow text-to-image, distilled and run on the device."""
import os

# Belt and braces for the privacy promise: nothing here may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `import flowflash` stays cheap for the CLI
    if name == "Pipeline":
        from .runtime.pipeline import Pipeline
        return Pipeline
    raise AttributeError(name)
