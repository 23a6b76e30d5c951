"""The Ray deployment files, checked without a Kubernetes cluster.

- deploy/kuberay/rayservice.yaml against a JSON schema written here for the part of KubeRay's
  ray.io/v1 RayService CRD that the manifest uses (field names, types, required fields; unknown
  fields refused at the levels listed, so a typo fails), plus what must agree across it: the
  GPU worker group asks Kubernetes for the GPU that Ray and the Serve replicas count on, the
  S3 settings and credentials come from the ConfigMap and the Secret, the Secret holds
  placeholders only.
- The Serve configs (deploy/serve_config.yaml and the manifest's serveConfigV2) against Ray
  Serve's own schema (ServeDeploySchema), and their builder arguments through app.cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
CONTAINER = {
    "type": "object", "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"}, "image": {"type": "string"},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "envFrom": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                "properties": {"secretRef": {"type": "object"},
                                                               "configMapRef": {"type": "object"},
                                                               "prefix": {"type": "string"}}}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "resources": {"type": "object", "additionalProperties": False,
                      "properties": {"requests": QUANTITIES, "limits": QUANTITIES}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
    "additionalProperties": False,
}
POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"metadata": {"type": "object"}, "spec": {
        "type": "object", "required": ["containers"],
        "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                       "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                       "tolerations": {"type": "array", "items": {"type": "object"}},
                       "nodeSelector": STRING_MAP},
        "additionalProperties": False}},
    "additionalProperties": False,
}
RAYSERVICE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["serveConfigV2", "rayClusterConfig"], "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string"},
                "rayClusterConfig": {
                    "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
                            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                            "idleTimeoutSeconds": {"type": "integer"}}},
                        "headGroupSpec": {"type": "object", "required": ["template"], "additionalProperties": False,
                                          "properties": {"rayStartParams": STRING_MAP, "template": POD_TEMPLATE}},
                        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["groupName", "template"], "additionalProperties": False,
                            "properties": {"groupName": {"type": "string"},
                                           "replicas": {"type": "integer", "minimum": 0},
                                           "minReplicas": {"type": "integer", "minimum": 0},
                                           "maxReplicas": {"type": "integer", "minimum": 0},
                                           "rayStartParams": STRING_MAP, "template": POD_TEMPLATE}}},
                    },
                },
            },
        },
    },
}


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def test_rayservice_matches_the_crd_schema_excerpt() -> None:
    jsonschema.validate(documents()["RayService"], RAYSERVICE_SCHEMA)


def test_schema_refuses_a_typo() -> None:
    service = documents()["RayService"]
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, RAYSERVICE_SCHEMA)


def test_gpu_group_settings_and_secret_agree() -> None:
    docs = documents()
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    serve_config = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    args = serve_config["applications"][0]["args"]
    assert args["num_gpus"] == 1 and args["max_replicas"] <= gpu["maxReplicas"]  # one replica per GPU
    assert cluster["enableInTreeAutoscaling"] is True

    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        refs = {(k, v["name"]) for ref in group["template"]["spec"]["containers"][0]["envFrom"]
                for k, v in ref.items()}
        assert refs == {("secretRef", "patchcore-s3"), ("configMapRef", "patchcore-settings")}
    settings = docs["ConfigMap"]["data"]
    assert settings["PATCHCORE_STORE"] == "s3" and settings["PATCHCORE_S3_BUCKET"]
    assert not any("SECRET" in key or "API_KEY" in key for key in settings)  # secrets stay in the Secret
    secret = docs["Secret"]["stringData"]
    assert set(secret) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PATCHCORE_ADMIN_API_KEY"}
    assert all(value.startswith("REPLACE_ME") for value in secret.values())


@pytest.mark.parametrize("source", ["serve_config.yaml", "rayservice.yaml"])
def test_serve_configs_pass_ray_serves_schema(source: str) -> None:
    pytest.importorskip("ray.serve", reason="ray is not installed (pip install -e '.[ray]')")
    from ray.serve.schema import ServeDeploySchema

    from app.cluster.serve_app import build_options

    if source == "serve_config.yaml":
        config = yaml.safe_load(SERVE_CONFIG.read_text())
    else:
        config = yaml.safe_load(documents()["RayService"]["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "app.cluster.serve_app:build"
    options = build_options(application.args)
    assert options["autoscaling_config"]["min_replicas"] <= options["autoscaling_config"]["max_replicas"]
    if source == "rayservice.yaml":
        assert options["ray_actor_options"]["num_gpus"] == 1.0


def test_serve_cli_shares_one_gpu_between_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --engine ray --replicas 4 --num-gpus 0.25`: four replica processes on one GPU (the
    way to fill a GPU that one process cannot: README, GPU path). No GPU here: the options are
    checked, the deployment is not run."""
    pytest.importorskip("ray.serve", reason="ray is not installed (pip install -e '.[ray]')")
    from app import cli
    from app.cluster import serve_app

    deployed: dict = {}
    monkeypatch.setattr(serve_app, "deploy", lambda **kwargs: deployed.update(kwargs))
    assert cli.main(["serve", "--engine", "ray", "--replicas", "4", "--num-gpus", "0.25"]) == 0
    assert deployed["replicas"] == 4 and deployed["num_gpus"] == 0.25
    options = serve_app.build_options({"replicas": deployed["replicas"], "num_cpus": deployed["num_cpus"],
                                       "num_gpus": deployed["num_gpus"]})
    assert options["num_replicas"] == 4 and options["ray_actor_options"]["num_gpus"] == 0.25
    for bad in ("-1", "nan", "many"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["serve", "--engine", "ray", "--num-gpus", bad])
        assert exited.value.code == 2
