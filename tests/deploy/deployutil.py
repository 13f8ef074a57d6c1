"""deploy/ read and checked offline against the published schemas, never hand-written ones.

Kubernetes objects: `kubernetes-validate`, the API's own OpenAPI schemas per release, strict
(an unknown field fails, as `kubectl apply --validate=strict` does). KServe objects: the
openAPIV3Schema of KServe's CRDs as released (vendored in schemas/kserve/, README there), held
to the API server's rules for structural schemas: an unknown field fails unless the schema
preserves unknown fields, and metadata is an ObjectMeta. Kustomizations are rendered (their
resources plus RFC 6902 patches) and the result is checked like any other object.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
from typing import Any, Iterator

import jsonpatch
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_DIR = pathlib.Path(__file__).resolve().parent / "schemas" / "kserve"
# The oldest and the newest Kubernetes minor release kubernetes-validate 1.37.0 ships schemas for
# that upstream still supports (the three newest minors): every manifest must pass both.
K8S_VERSIONS = ("1.35", "1.37")
KSERVE_GROUP = "serving.kserve.io"
KUSTOMIZATION = "kustomization.yaml"
_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "patches"}  # what render() understands


def load_docs(path: pathlib.Path) -> list[dict]:
  """The YAML documents of a file (empty ones dropped)."""
  return [d for d in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if d is not None]


def yaml_files() -> list[pathlib.Path]:
  return sorted(DEPLOY.rglob("*.y*ml"))


def patch_files() -> set[pathlib.Path]:
  """Files that kustomizations use as patches (lists of operations, not objects)."""
  out = set()
  for k in DEPLOY.rglob(KUSTOMIZATION):
    for p in load_docs(k)[0].get("patches", []):
      out.add((k.parent / p["path"]).resolve())
  return out


def object_files() -> list[pathlib.Path]:
  """Every file under deploy/ that holds Kubernetes or KServe objects."""
  skip = patch_files()
  return [p for p in yaml_files() if p.name != KUSTOMIZATION and p.resolve() not in skip]


def render(folder: pathlib.Path) -> list[dict]:
  """The objects `kubectl kustomize folder` prints, for the subset of kustomize used here:
  `resources` (files, or folders with their own kustomization) and `patches` given as RFC 6902
  operation lists with a target. Anything else fails loudly rather than rendering wrong."""
  spec = load_docs(folder / KUSTOMIZATION)[0]
  unknown = set(spec) - _KUSTOMIZE_KEYS
  if unknown:
    raise ValueError(f"{folder / KUSTOMIZATION}: render() does not implement {sorted(unknown)}")
  objects: list[dict] = []
  for res in spec.get("resources", []):
    path = (folder / res).resolve()
    objects += render(path) if path.is_dir() else load_docs(path)
  for patch in spec.get("patches", []):
    ops = load_docs(folder / patch["path"])[0]
    if not isinstance(ops, list):
      raise ValueError(f"{patch['path']}: only RFC 6902 (JSON patch) operation lists are rendered")
    hits = [i for i, obj in enumerate(objects) if _targets(patch["target"], obj)]
    if not hits:
      raise ValueError(f"{patch['path']}: its target {patch['target']} matches no object")
    for i in hits:
      objects[i] = jsonpatch.apply_patch(objects[i], ops)
  return objects


def _targets(target: dict, obj: dict) -> bool:
  group, _, version = obj["apiVersion"].rpartition("/")
  have = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
  return all(have[k] == v for k, v in target.items())


def kustomize_folders() -> list[pathlib.Path]:
  return sorted(p.parent for p in DEPLOY.rglob(KUSTOMIZATION))


# -- validation ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Schemas:
  """Validators for every kind under deploy/: KServe CRD versions loaded once."""

  crds: dict[tuple[str, str], dict]  # (apiVersion, kind) -> openAPIV3Schema made strict
  object_meta: dict  # Kubernetes' strict ObjectMeta schema, for a custom resource's metadata

  @classmethod
  def load(cls) -> Schemas:
    crds = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
      for crd in load_docs(path):
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
          schema = strict_structural(version["schema"]["openAPIV3Schema"])
          crds[(f"{group}/{version['name']}", kind)] = schema
    definitions = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSIONS[-1]}.0-local-strict/_definitions.json",
        K8S_VERSIONS[-1])
    meta = {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
            "$defs": definitions["$defs"]}
    return cls(crds=crds, object_meta=meta)

  def errors(self, obj: dict) -> list[str]:
    """Every schema violation of `obj` (empty: it validates); an object with no schema fails."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
      return ["not an object with apiVersion and kind"]
    if obj["apiVersion"].split("/")[0] == KSERVE_GROUP:
      return self._crd_errors(obj)
    out = []
    for version in K8S_VERSIONS:
      try:
        kubernetes_validate.validate(obj, version, strict=True)
      except kubernetes_validate.ValidationError as e:
        out.append(f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
      except kv_utils.SchemaNotFoundError as e:
        out.append(f"Kubernetes {version}: {e.message}")
    return out

  def _crd_errors(self, obj: dict) -> list[str]:
    schema = self.crds.get((obj["apiVersion"], obj["kind"]))
    if schema is None:
      return [f"no KServe CRD schema for {obj['apiVersion']} {obj['kind']} in {CRD_DIR}"]
    found = [f"{'.'.join(map(str, e.path))}: {e.message}"
             for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    meta = jsonschema.Draft202012Validator(self.object_meta)
    found += [f"metadata.{'.'.join(map(str, e.path))}: {e.message}"
              for e in meta.iter_errors(obj.get("metadata", {}))]
    return found


def strict_structural(schema: dict) -> dict:
  """A CRD schema as the API server applies it with strict field validation: an object schema
  that lists `properties` rejects other fields, unless it has `additionalProperties` or
  `x-kubernetes-preserve-unknown-fields`; embedded resources allow apiVersion, kind and metadata."""
  out = copy.deepcopy(schema)
  for node in _schema_nodes(out):
    if node.get("x-kubernetes-embedded-resource"):
      props = node.setdefault("properties", {})
      for key in ("apiVersion", "kind"):
        props.setdefault(key, {"type": "string"})
      props.setdefault("metadata", {"type": "object"})
    if ("properties" in node and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")):
      node["additionalProperties"] = False
  return out


def _schema_nodes(node: Any) -> Iterator[dict]:
  if isinstance(node, dict):
    yield node
    for key, value in node.items():
      if key in ("properties",):
        for sub in value.values():
          yield from _schema_nodes(sub)
      elif key in ("items", "additionalProperties", "not"):
        yield from _schema_nodes(value)
      elif key in ("allOf", "anyOf", "oneOf"):
        for sub in value:
          yield from _schema_nodes(sub)


# -- reading the objects ------------------------------------------------------------------------

def all_objects() -> dict[str, list[dict]]:
  """file (relative to the repository) -> its objects; rendered kustomizations as 'DIR/'."""
  out = {str(p.relative_to(ROOT)): load_docs(p) for p in object_files()}
  for folder in kustomize_folders():
    out[f"{folder.relative_to(ROOT)}/ (kustomize)"] = render(folder)
  return out


def dockerfile() -> str:
  """The Dockerfile with continuation lines joined."""
  return (ROOT / "Dockerfile").read_text().replace("\\\n", " ")


def dockerfile_uid() -> int:
  """The numeric user the image runs as (`USER uid[:gid]`)."""
  return int(re.search(r"^USER (\d+)(?::\d+)?$", dockerfile(), re.M).group(1))


def one(objects: list[dict], kind: str) -> dict:
  found = [o for o in objects if o["kind"] == kind]
  assert len(found) == 1, f"expected one {kind}, found {len(found)}"
  return found[0]
