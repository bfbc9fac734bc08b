"""Every YAML in cluster/ parses; entrypoints name real scripts whose parsers accept their flags."""

import re
import shlex

import pytest
import yaml

from pipeline import inference
from pipeline.config import build_parser, load_config
from pipeline.pretrain_config import ALIASES as PRETRAIN_ALIASES
from pipeline.pretrain_config import PretrainConfig

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "cluster").rglob("*.yaml"))
PARSERS = {"jobs/pretrain.py": (PretrainConfig, PRETRAIN_ALIASES), "jobs/batch_infer.py": (inference.InferConfig, inference.ALIASES)}


def _docs():
    for path in YAMLS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc
                if doc.get("kind") == "ConfigMap":  # a RayJob carried inside a ConfigMap
                    for text in doc["data"].values():
                        yield path, yaml.safe_load(text)


def _walk(obj):
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def test_all_cluster_yaml_parses():
    assert len(YAMLS) >= 5
    kinds = {doc.get("kind") for _, doc in _docs()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds


def test_entrypoints_are_accepted_by_the_jobs_parsers():
    entrypoints = [d["entrypoint"] for _, doc in _docs() for d in _walk(doc) if "entrypoint" in d]
    assert len(entrypoints) >= 3
    for ep in entrypoints:
        argv = shlex.split(ep)
        assert argv[0] == "python" and (ROOT / argv[1]).exists(), ep
        schema, aliases = PARSERS[argv[1]]
        args = build_parser(schema, aliases, "").parse_args([a.replace("configs/", str(ROOT / "configs") + "/", 1)
                                                              if a.startswith("configs/") else a for a in argv[2:]])
        load_config(schema, args, aliases)  # the values validate too


def test_gpu_groups_request_gpus_and_jobs_have_lifecycle_fields():
    for path, doc in _docs():
        for group in (d for d in _walk(doc) if "groupName" in d):
            limits = [c["resources"]["limits"] for c in group["template"]["spec"]["containers"]]
            if group["groupName"] == "gpu":
                assert all("nvidia.com/gpu" in lim for lim in limits), path
        for job in (d for d in _walk(doc) if "entrypoint" in d):
            assert job["shutdownAfterJobFinishes"] is True and "activeDeadlineSeconds" in job, path
    aws = yaml.safe_load((ROOT / "cluster/aws/cluster.yaml").read_text())
    assert aws["available_node_types"]["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "gpu_ondemand" in aws["available_node_types"] and aws["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("path", YAMLS + [ROOT / "cluster/k8s/Dockerfile"], ids=lambda p: p.name)
def test_no_credentials_inline(path):
    text = path.read_text()
    assert not re.search(r"(?i)(aws_secret_access_key|aws_access_key_id|secretKey|accessKey)\s*[:=]", text), path
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
