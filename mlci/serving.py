"""A tuned build as an MLflow pyfunc model, which `mlflow.pyfunc.load_model` and `mlflow models serve` run.

This file is the model's code as well as the code that saves it (MLflow's "models from code"): MLflow
copies it into every saved model and runs it again to load the model. So it imports nothing from mlci,
and serving a model needs only what its requirements pin (TVM's runtime, tvm-ffi, numpy) and MLflow,
not mlci or the model's ONNX file.

The model's artifacts are the exported library (the Relax executable with its kernels, which the
Relax VM loads by itself) and ``interface.json``: the names, dtypes and shapes the library's `main`
takes and returns, in order::

    {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 32]}],
     "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 8]}]}

(-1: a dimension the ONNX model leaves open). `predict` takes a dict of input name -> array (what
``{"inputs": {...}}`` posted to ``/invocations`` becomes) and returns a dict of output name -> array.
"""

from __future__ import annotations

import json
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.models
import numpy as np
from mlflow.pyfunc import PythonModel

LIBRARY = "library"
INTERFACE = "interface"
"""Keys of the model's artifacts."""
REQUIRED_DISTRIBUTIONS = ("apache-tvm", "apache-tvm-ffi", "numpy")
"""What loading the library needs besides MLflow, pinned to the versions that built it: a library
exported by one TVM version is not guaranteed to load in another."""


def read_interface(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The interface file, checked: a damaged one is named rather than failing later inside TVM."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        for side in ("inputs", "outputs"):
            for tensor in data[side]:
                tensor["name"], tensor["shape"] = str(tensor["name"]), [int(d) for d in tensor["shape"]]
                tensor["dtype"] = np.dtype(tensor["dtype"]).name
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not a model interface file ({type(exc).__name__}: {exc})") from None
    return data


def _flatten(result: Any) -> list[Any]:
    """The VM's outputs in order: one tensor, or (nested) tuples of them."""
    if hasattr(result, "numpy"):
        return [result]
    return [tensor for item in result for tensor in _flatten(item)]


class TunedModel(PythonModel):
    """The exported library in a Relax VM on the device that `model_config` names.

    ``model_config``: ``device`` ("cpu", "cuda", ...; by default the kind the library was built
    for), ``device_id`` (default 0); ``target`` records the TVM target it was built for."""

    _skip_type_hint_validation = True
    """The signature's tensor specs check the inputs; without this, MLflow warns on every load that
    `predict` has no input annotation to check them by."""

    def load_context(self, context: Any) -> None:
        import tvm
        from tvm import relax

        config = dict(context.model_config or {})
        self.interface = read_interface(Path(context.artifacts[INTERFACE]))
        kind, index = str(config.get("device", "cpu")), int(config.get("device_id", 0))
        self.device = tvm.device(kind, index)
        if not self.device.exist:
            raise RuntimeError(f"this model runs on {kind}:{index} (built for {config.get('target')}), and this "
                               f"machine has no such device; load it where there is one, or give "
                               f"model_config={{'device': ...}} for a device the library was built for")
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(context.artifacts[LIBRARY]), self.device)
        self.main = self.vm["main"]
        self.lock = threading.Lock()  # one VM, whose calls share its registers: one call at a time

    def inputs(self, model_input: Any) -> list[np.ndarray]:
        """`model_input` in the library's argument order, each checked against the interface."""
        specs = self.interface["inputs"]
        if isinstance(model_input, np.ndarray) and len(specs) == 1:
            model_input = {specs[0]["name"]: model_input}
        if not isinstance(model_input, dict):
            raise TypeError(f"expected a dict of input name -> array ({', '.join(s['name'] for s in specs)}), "
                            f"got {type(model_input).__name__}")
        missing = [s["name"] for s in specs if s["name"] not in model_input]
        if missing:
            raise ValueError(f"missing input(s) {', '.join(missing)}; the model takes "
                             + ", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in specs))
        arrays = []
        for spec in specs:
            array = np.ascontiguousarray(model_input[spec["name"]], dtype=spec["dtype"])
            expected = spec["shape"]
            if len(array.shape) != len(expected) or any(e not in (-1, a) for e, a in zip(expected, array.shape)):
                raise ValueError(f"input {spec['name']}: shape {list(array.shape)} does not match the "
                                 f"model's {expected}")
            arrays.append(array)
        return arrays

    # model_input (a dict of input name -> array) is not annotated: MLflow would take the annotation
    # for a list-of-examples input type, and warn that it cannot infer a signature from it.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        import tvm

        arrays = self.inputs(model_input)
        with self.lock:
            result = self.main(*[tvm.runtime.tensor(a, self.device) for a in arrays])
            outputs = [np.asarray(t.numpy()) for t in _flatten(result)]
        names = [o["name"] for o in self.interface["outputs"]]
        if len(names) != len(outputs):  # an interface file that does not belong to this library
            raise RuntimeError(f"the library returned {len(outputs)} outputs, its interface names {len(names)}")
        return dict(zip(names, outputs, strict=True))


def signature(interface: dict[str, list[dict[str, Any]]]) -> Any:
    """Tensor specs of every input and output: MLflow checks inputs against them before `predict`."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(side: str) -> Schema:
        return Schema([TensorSpec(np.dtype(t["dtype"]), tuple(t["shape"]), t["name"]) for t in interface[side]])

    return ModelSignature(inputs=schema("inputs"), outputs=schema("outputs"))


def pip_requirements() -> list[str]:
    """The installed versions of what the model needs (a TVM built from source has no version to pin)."""
    pins = []
    for name in REQUIRED_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def save_model(path: Path, *, library: Path, interface: Path, device: str, target: Any,
               metadata: dict[str, Any]) -> None:
    """Save the build as an MLflow model in the new directory `path` (logged into a run from there)."""
    import warnings

    import mlflow.pyfunc

    with warnings.catch_warnings():
        # MLflow suggests an input example: the signature says all it would, and checking an example
        # would load and run the library once more.
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=Path(__file__),
            artifacts={LIBRARY: str(library), INTERFACE: str(interface)},
            model_config={"device": device, "device_id": 0, "target": target},
            signature=signature(read_interface(interface)),
            pip_requirements=pip_requirements(),
            metadata=metadata,
        )


if __name__ != "mlci.serving":  # run by MLflow as the model's code, not imported as part of mlci
    mlflow.models.set_model(TunedModel())
