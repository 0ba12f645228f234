"""The repo's Serve config file (deploy/ray-serve.yaml) is one Ray Serve accepts, and it builds our application
with the options it names. No Ray instance is started: building an application is plain Python."""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
yaml = pytest.importorskip("yaml")

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray-serve.yaml"


def test_the_serve_config_file_is_valid_and_builds_the_replicas():
    from ray.serve.schema import ServeDeploySchema

    from zimage_ui.scale.replica import DEPLOYMENT_NAME, MAX_ONGOING, app_builder

    config = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app_config = schema.applications[0]
    assert app_config.import_path == "zimage_ui.scale.replica:app_builder"
    assert app_config.args["app_name"] == app_config.name  # the board is found by the application's name
    deployment = app_config.deployments[0]
    assert deployment.name == DEPLOYMENT_NAME and deployment.max_ongoing_requests == MAX_ONGOING

    app = app_builder(app_config.args)
    built = app._bound_deployment  # Serve's own record of the deployment the builder made
    assert built.name == DEPLOYMENT_NAME
    assert built._deployment_config.num_replicas == app_config.args["replicas"]
    assert built.ray_actor_options["num_gpus"] == 1
    assert built._deployment_config.max_ongoing_requests == MAX_ONGOING
    router = built._deployment_config.request_router_config
    assert router.request_router_class == "zimage_ui.scale.routing:ZImageRouter"
    assert built.init_kwargs["app_name"] == "zimage"
    settings = built.init_args[0]
    assert settings["model"] == "auto" and settings["max_queue"] == 16
