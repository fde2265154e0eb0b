"""The released checkpoint as an MLflow model (models-from-code: MLflow runs this file, nothing is unpickled).

    model = mlflow.pyfunc.load_model("models:/sophon-quick-classification/1")
    logits = model.predict(images)                        # classifier: float N×C×H×W in [0, 1] → N×classes
    noise = model.predict({"x_t": x_t, "t": timesteps})   # diffusion UNet: ε_θ(x_t, t)

The weights are the checkpoint's safetensors and JSON card, logged as the artifact `checkpoint`.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SophonCheckpoint(PythonModel):
    def load_context(self, context):
        from sophon.models import read_card

        folder = context.artifacts["checkpoint"]
        self.card = read_card(folder)
        if self.card["kind"] == "classifier":
            from sophon.models import load_classifier

            self.model = load_classifier(folder)[0].eval()
        else:
            from sophon.diffusion import load_unet

            self.model = load_unet(folder)[0].eval()

    def predict(self, context, model_input, params=None):
        import torch

        with torch.no_grad():
            if self.card["kind"] == "classifier":
                return self.model(torch.as_tensor(np.asarray(model_input), dtype=torch.float32)).numpy()
            x_t = torch.as_tensor(np.asarray(model_input["x_t"]), dtype=torch.float32)
            t = torch.as_tensor(np.asarray(model_input["t"]), dtype=torch.long)
            return self.model(x_t, t).sample.numpy()


mlflow.models.set_model(SophonCheckpoint())
