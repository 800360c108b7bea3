"""The one served model as the Ollama API describes it (`ModelCard`: /api/tags, /api/show, /api/ps)
and the model-management answers (/api/pull of the served model; 501 for push, create, copy, delete
and blob uploads). No HTTP, no torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from harness.serve.ollama_fields import ApiError, typed_field

# ----------------------------------------------------------------------------- the served model

@dataclass
class ModelCard:
    """What the API says about the one served model (built by harness.serve.card.describe_model)."""
    name: str                      # "x" is served as "x:latest" and answers to both
    digest: str                    # sha256 hex of the weights file(s): stable per weights
    size: int                      # bytes of the weights on disk
    modified_at: str
    details: dict
    model_info: dict
    template: str
    parameters: str
    context_length: int
    size_vram: int = 0
    expires_at: str = field(default_factory=lambda: (datetime.now(timezone.utc) + timedelta(days=36500))
                            .isoformat().replace("+00:00", "Z"))   # never unloaded

    @property
    def supports_tools(self) -> bool:
        """Ollama's test: the chat template mentions tools."""
        return "tools" in self.template

    @property
    def tag(self) -> str:
        return self.name if ":" in self.name else f"{self.name}:latest"

    def matches(self, requested: str) -> bool:
        """Ollama's naming: "x" means "x:latest"; case does not matter."""
        requested = requested if ":" in requested else f"{requested}:latest"
        return requested.lower() == self.tag.lower()

    def tags(self) -> dict:
        return {"models": [{"name": self.tag, "model": self.tag, "modified_at": self.modified_at,
                            "size": self.size, "digest": self.digest, "details": self.details}]}

    def show(self) -> dict:
        source = self.model_info.get("harness.source", self.name)
        return {"modelfile": f"# served by harness.serve\nFROM {source}\n",
                "parameters": self.parameters, "template": self.template, "details": self.details,
                "model_info": self.model_info, "modified_at": self.modified_at,
                "capabilities": ["completion"] + (["tools"] if self.supports_tools else [])}

    def ps(self) -> dict:
        return {"models": [{"name": self.tag, "model": self.tag, "size": self.size, "digest": self.digest,
                            "details": self.details, "expires_at": self.expires_at,
                            "size_vram": self.size_vram, "context_length": self.context_length}]}



def requested_model(body: dict, card: ModelCard) -> str:
    """The `model` of a chat, generate or embed request, as the client spelled it (echoed back, like
    Ollama); 400 when absent, 404 when it is not the served model."""
    model = typed_field(body, "model", (str,), "")
    if not model:
        raise ApiError(400, "model is required")
    if not card.matches(model):
        raise ApiError(404, f"model '{model}' not found")
    return model


# ----------------------------------------------------------------------------- model management

def parse_pull(body: dict, card: ModelCard) -> tuple[str, bool]:
    """(the name, stream) of a pull of the served model; any other name is a 404."""
    model = body.get("model") or body.get("name")   # older clients send "name"
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a string)")
    if not card.matches(model):
        raise ApiError(404, f"model '{model}' not found: harness.serve serves only '{card.tag}' "
                            "and cannot pull other models")
    return model, typed_field(body, "stream", (bool,), True)


def pull_progress(card: ModelCard) -> list[dict]:
    """Ollama's pull status lines for a model that is already here: nothing to download."""
    return [{"status": "pulling manifest"},
            {"status": f"pulling {card.digest[:12]}", "digest": f"sha256:{card.digest}",
             "total": card.size, "completed": card.size},
            {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]


UNSUPPORTED = {"/api/push": "push", "/api/create": "create", "/api/copy": "copy", "/api/delete": "delete",
               "/api/blobs": "blob upload"}


def not_supported(path: str, card: ModelCard) -> ApiError:
    """501 for Ollama's model management: harness.serve serves one fixed model."""
    what = next((w for p, w in UNSUPPORTED.items() if path == p or path.startswith(p + "/")), path)
    return ApiError(501, f"{path}: model {what} is not supported; harness.serve serves one fixed model "
                         f"('{card.tag}') and manages no others")
