"""The differential cases: store layouts (provider kwargs and the equivalent broker backend), the values
seeded in the real stores, and the lookups asked of both.

Every value is generated here from fixed lists (no randomness: a failure names a case that is the same on
the next run). Each variant is one provider backend with one set of kwargs and one broker backend with the
same settings; every variant's ids are its own, so no two variants see each other's secrets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Characters the broker allows in an id besides letters, digits and '_' (broker/resolver.py), and some
# it refuses (a provider may look them up).
ID_MARKS = [".", "-", ":", "@", "+", "=", ",", "~"]
# Key Vault names hold only letters, digits and '-' ('_' becomes the separator): most Azure ids use those,
# one in three a mark that no Key Vault name can hold (both sides then find nothing).
AZURE_MARKS = ["-", "_", "."]
# Secret Manager secret ids hold letters, digits, '-' and '_': one id in three has a mark no id can hold
# (the provider sends it and gets INVALID_ARGUMENT, the broker does not send it).
GCP_MARKS = ["-", "_", "."]
REFUSED_IDS = ["a b", "a%2Fb", "a?b", "a#b", ".."]

PASSWORD = "p@ss/w:rd#?&=+ %"  # every character a URI must percent-encode
QUOTED_PASSWORD = "p%40ss%2Fw%3Ard%23%3F%26%3D%2B%20%25"

URIS = [
    "postgres://user:pw@db.example:5432/analytics",
    f"postgres://user:{QUOTED_PASSWORD}@db.example:5432/analytics",
    "postgresql://user:pw@db.example/analytics",
    "mysql://db.example",
    "mysql://user@db.example",
    "http://:only-password@api.example",
    "https://api.example:8443/?verify=false&timeout=5&retries=3&ratio=0.5&name=x",
    "http://api.example/?ssl=true&timeout=5",
    "http://api.example/?flag=null&empty=&list=%5B1%2C2%5D",
    "http://api.example/?__extra__=%7B%22a%22%3A+1%2C+%22b%22%3A+%7B%22c%22%3A+%5Btrue%5D%7D%7D",
    "aws://?region_name=eu-west-1&role_arn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fx",
    "google-cloud-platform://?extra__google_cloud_platform__project=proj",
    "sqlite:///relative/path.db",
    "spark://spark://master.example:7077",
    "ftp://u%20s:p%20w@ftp.example:21/dir%2Fsub",
    "http://h%C3%B6st.example/sch%C3%A9ma",
    "  http://padded.example  ",
    "http://h.example:0",
    "http://[::1]:8080/db",
    "snowflake://user:pw@account/db?warehouse=wh&role=r&insecure_mode=true",
]

JSONS: list[dict[str, Any]] = [
    {"conn_type": "postgres", "host": "h", "login": "u", "password": PASSWORD, "port": 5432, "schema": "s"},
    {"conn_type": "postgres", "host": "h", "port": "5432", "extra": {"sslmode": "require", "n": {"x": [1, 2]}}},
    {"conn_type": "http", "host": "h", "extra": json.dumps({"timeout": 5, "verify": False})},
    {"conn_type": "http", "host": "", "login": "", "password": "", "schema": ""},
    {"conn_type": "http", "description": "the API", "host": "h"},
    {"conn_type": "aws"},
    {"conn_type": "http", "extra": "not json"},
    {"conn_type": "postgres", "host": "h", "port": None, "extra": None},
    {"conn_type": "postgres", "user": "aliased-user", "database": "aliased-db", "remote_host": "aliased-host"},
    {"engine": "mysql", "username": "u2", "pass": "p2", "server": "s2", "port": 3306},
    {"conn_type": "http", "host": "h", "conn_id": "inner-id"},
    {"conn_type": "http", "host": "h", "unknown_key": "x"},
    {"conn_type": "http", "host": "ünï.example", "password": "🔑"},
]

VARIABLES = [
    "plain",
    "",
    " padded ",
    "multi\nline\n",
    "ünïcode 🚀",
    json.dumps({"a": 1, "b": [True, None]}),
    "[1, 2, 3]",
    "42",
    PASSWORD,
]


@dataclass
class Variant:
    """One provider backend with kwargs and the equivalent broker backend (``{url}`` etc. filled later)."""

    name: str
    store: str  # vault_kv2, vault_kv1, secretsmanager, ssm, azure, gcp, env, file
    provider: str
    kwargs: dict[str, Any]
    broker: dict[str, Any]
    # (kind, id) -> where the provider reads it: the store path or name; None: this kind is off
    layout: dict[str, str | None]
    sep: str = "/"
    multi_team: bool = False  # Airflow's [core] multi_team (and the broker's multi_team) for this variant
    # path lists: the Vault base paths tried in order (seeded one by one); mount_null: ids carry the mount
    path_list: list[str] = field(default_factory=list)
    mount_null: bool = False

    @property
    def marks(self) -> list[str]:
        return {"azure": AZURE_MARKS, "gcp": GCP_MARKS}.get(self.store, ID_MARKS)

    def path(self, kind: str, key: str, team: str | None = None) -> str | None:
        prefix = self.layout.get(kind)
        if prefix is None:
            return None
        if self.store == "file":  # LocalFilesystemBackend: the id is the file's key
            return key
        if self.store == "env":  # EnvironmentVariablesBackend: upper-cased; a team's is {prefix}_{TEAM}___{ID}
            team_part = f"_{team.upper()}___" if team is not None else ""
            return f"{prefix}{team_part}{key.upper()}"
        if self.store == "azure":
            # AzureKeyVaultBackend: a trailing sep is stripped from the prefix, an empty prefix means the id
            # alone, a team reads {team}--{id}, and every '_' of the whole name becomes sep.
            prefix = prefix.rstrip(self.sep)
            key = f"{team}--{key}" if team is not None else key
            return (f"{prefix}{self.sep}{key}" if prefix else key).replace("_", self.sep)
        if self.store == "gcp":
            # CloudSecretManagerBackend: {prefix}{sep}{id} (an empty prefix keeps sep), a team's is
            # {prefix}{sep}{team}--{id}, the id verbatim
            key = f"{team}--{key}" if team is not None else key
            return f"{prefix}{self.sep}{key}"
        if team is not None:
            if self.store.startswith("vault"):
                prefix = f"{prefix}/{team}"
            else:
                key = f"{team}--{key}"
        return f"{prefix}{self.sep}{key}" if prefix else key


VAULT = "airflow.providers.hashicorp.secrets.vault.VaultBackend"
SM = "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend"
SSM = "airflow.providers.amazon.aws.secrets.systems_manager.SystemsManagerParameterStoreBackend"
AKV = "airflow.providers.microsoft.azure.secrets.key_vault.AzureKeyVaultBackend"
GSM = "airflow.providers.google.cloud.secrets.secret_manager.CloudSecretManagerBackend"
ENV = "airflow.secrets.environment_variables.EnvironmentVariablesBackend"
FILE = "airflow.secrets.local_filesystem.LocalFilesystemBackend"
CONNECTION_ARGS = ("conn_type", "host", "login", "password", "schema", "port", "extra", "description")
FILE_REFUSED_URIS = ["spark://spark://master.example:7077"]  # Airflow's ORM Connection refuses it
# {files} is the test's directory of secrets files; the kwargs are Airflow's, verbatim, on both sides
# (configs_file_path is Airflow 3's: left out, so the variant runs on Airflow 2 too)
FILE_KWARGS = {"connections_file_path": "{files}/connections.json", "variables_file_path": "{files}/variables.json"}
ENV_FILES = {"connections_file_path": "{files}/connections.env", "variables_file_path": "{files}/variables.env"}
ENV_DEFAULTS = {"connection": "AIRFLOW_CONN_", "variable": "AIRFLOW_VAR_", "config": None}
AZURE_DEFAULTS = {"connection": "airflow-connections", "variable": "airflow-variables", "config": "airflow-config"}
GCP_DEFAULTS = AZURE_DEFAULTS

VARIANTS = [
    Variant(
        "vault-kv2-defaults",
        "vault_kv2",
        VAULT,
        {"mount_point": "secret"},
        {},
        {"connection": "connections", "variable": "variables", "config": "config"},
    ),
    Variant(
        "vault-kv2-paths",
        "vault_kv2",
        VAULT,
        {"mount_point": "secret", "connections_path": "af/conns/", "variables_path": "af/vars", "config_path": None},
        {"connections_path": "af/conns/", "variables_path": "af/vars", "config_path": None},
        {"connection": "af/conns", "variable": "af/vars", "config": None},
    ),
    Variant(
        "vault-kv1",
        "vault_kv1",
        VAULT,
        {"mount_point": "kv1", "kv_engine_version": 1, "connections_path": "conns", "variables_path": "vars"},
        {"mount_point": "kv1", "kv_engine_version": 1, "connections_path": "conns", "variables_path": "vars"},
        {"connection": "conns", "variable": "vars", "config": "config"},
    ),
    Variant(
        "secretsmanager-defaults",
        "secretsmanager",
        SM,
        {},
        {},
        {"connection": "airflow/connections", "variable": "airflow/variables", "config": "airflow/config"},
    ),
    Variant(
        "secretsmanager-dash",
        "secretsmanager",
        SM,
        {
            "connections_prefix": "af-conn-",
            "variables_prefix": "af-var",
            "config_prefix": None,
            "sep": "-",
            "variables_lookup_pattern": "^(keep|k)",
            "extra_conn_words": {"login": ["usr"], "password": ["pwd"]},
        },
        {
            "connections_prefix": "af-conn-",
            "variables_prefix": "af-var",
            "config_prefix": None,
            "sep": "-",
            "variables_lookup_pattern": "^(keep|k)",
            "extra_conn_words": {"login": ["usr"], "password": ["pwd"]},
        },
        {"connection": "af-conn", "variable": "af-var", "config": None},
        sep="-",
    ),
    Variant(
        "ssm-defaults",
        "ssm",
        SSM,
        {},
        {},
        {"connection": "/airflow/connections", "variable": "/airflow/variables", "config": "/airflow/config"},
    ),
    Variant(
        "ssm-prefixes",
        "ssm",
        SSM,
        {"connections_prefix": "af/conns/", "variables_prefix": "", "connections_lookup_pattern": "^C"},
        {"connections_prefix": "af/conns/", "variables_prefix": "", "connections_lookup_pattern": "^C"},
        {"connection": "/af/conns", "variable": "", "config": "/airflow/config"},
    ),
    Variant("azure-defaults", "azure", AKV, {}, {}, AZURE_DEFAULTS, sep="-"),
    Variant("gcp-defaults", "gcp", GSM, {}, {}, GCP_DEFAULTS, sep="-"),
    Variant("env-defaults", "env", ENV, {}, {}, ENV_DEFAULTS, sep=""),
    Variant("file-json", "file", FILE, FILE_KWARGS, FILE_KWARGS, {"connection": "", "variable": "", "config": None}),
    Variant("file-env", "file", FILE, ENV_FILES, ENV_FILES, {"connection": "", "variable": "", "config": None}),
]

# A secrets file with one entry Airflow cannot build beside good ones (bad_entry_plan).
BAD_ENTRY_VARIANTS = [
    Variant("file-one-bad-entry", "file", FILE, FILE_KWARGS, FILE_KWARGS, {"connection": "", "variable": ""}),
]

# Layouts whose names alone are compared (naming_plan).
NAMING_VARIANTS = [
    Variant(
        "azure-prefixes",
        "azure",
        AKV,
        {"connections_prefix": "af-conns--", "variables_prefix": "", "config_prefix": None, "retry_total": 1},
        {"connections_prefix": "af-conns--", "variables_prefix": "", "config_prefix": None, "retry_total": 1},
        {"connection": "af-conns--", "variable": "", "config": None},
        sep="-",
    ),
    Variant(
        "azure-sep",
        "azure",
        AKV,
        # api_version here and retry_total above go to the provider's SecretClient; the broker reads the
        # first and ignores the second with a warning: a verbatim copy loads
        {"connections_prefix": "afxconnsx", "variables_prefix": "afvars", "sep": "x", "api_version": "7.4"},
        {"connections_prefix": "afxconnsx", "variables_prefix": "afvars", "sep": "x", "api_version": "7.4"},
        {"connection": "afxconnsx", "variable": "afvars", "config": "airflow-config"},
        sep="x",
    ),
    Variant(
        "gcp-prefixes",
        "gcp",
        GSM,
        # an empty prefix keeps sep ("-{id}")
        {"connections_prefix": "af-conns", "variables_prefix": "", "config_prefix": None},
        {"connections_prefix": "af-conns", "variables_prefix": "", "config_prefix": None},
        {"connection": "af-conns", "variable": "", "config": None},
        sep="-",
    ),
    Variant(
        "gcp-sep",
        "gcp",
        GSM,
        # the project by number, from the kwargs (the credentials name airflow-prod)
        {"connections_prefix": "af_conns", "variables_prefix": None, "sep": "__", "project_id": "123456789012"},
        {"connections_prefix": "af_conns", "variables_prefix": None, "sep": "__", "project_id": "123456789012"},
        {"connection": "af_conns", "variable": None, "config": "airflow-config"},
        sep="__",
    ),
]

TEAM_VARIANTS = [
    Variant(
        "vault-kv2-teams",
        "vault_kv2",
        VAULT,
        {"mount_point": "secret", "connections_path": "tconns", "variables_path": "tvars"},
        {"connections_path": "tconns", "variables_path": "tvars"},
        {"connection": "tconns", "variable": "tvars", "config": "config"},
        multi_team=True,
    ),
    Variant(
        "secretsmanager-teams",
        "secretsmanager",
        SM,
        {"connections_prefix": "t/conns", "variables_prefix": "t/vars"},
        {"connections_prefix": "t/conns", "variables_prefix": "t/vars"},
        {"connection": "t/conns", "variable": "t/vars", "config": "airflow/config"},
        multi_team=True,
    ),
    Variant(
        "ssm-teams",
        "ssm",
        SSM,
        {"connections_prefix": "/t/conns", "variables_prefix": "/t/vars"},
        {"connections_prefix": "/t/conns", "variables_prefix": "/t/vars"},
        {"connection": "/t/conns", "variable": "/t/vars", "config": "/airflow/config"},
        multi_team=True,
    ),
    Variant(
        "azure-teams",
        "azure",
        AKV,
        {"connections_prefix": "t-conns", "variables_prefix": "t-vars"},
        {"connections_prefix": "t-conns", "variables_prefix": "t-vars"},
        {"connection": "t-conns", "variable": "t-vars", "config": "airflow-config"},
        sep="-",
        multi_team=True,
    ),
    Variant(
        "gcp-teams",
        "gcp",
        GSM,
        {"connections_prefix": "t-conns", "variables_prefix": "t_vars", "sep": "_"},
        {"connections_prefix": "t-conns", "variables_prefix": "t_vars", "sep": "_"},
        {"connection": "t-conns", "variable": "t_vars", "config": "airflow-config"},
        sep="_",
        multi_team=True,
    ),
    Variant("env-teams", "env", ENV, {}, {}, ENV_DEFAULTS, sep="", multi_team=True),
]
LAYOUT_VARIANTS = [
    Variant(
        "vault-path-list",
        "vault_kv2",
        VAULT,
        {"mount_point": "secret", "connections_path": ["pl/first", "pl/second/"], "variables_path": ["pl/vfirst"]},
        {"connections_path": ["pl/first", "pl/second/"], "variables_path": ["pl/vfirst"]},
        {"connection": "pl/first", "variable": "pl/vfirst", "config": "config"},
        path_list=["pl/first", "pl/second"],
    ),
    Variant(
        "vault-global-secrets-path",
        "vault_kv2",
        VAULT,
        {"mount_point": "secret", "connections_path": "gs/own", "global_secrets_path": "gs/common/"},
        {"connections_path": "gs/own", "global_secrets_path": "gs/common/"},
        {"connection": "gs/own", "variable": "variables", "config": "config"},
        path_list=["gs/own", "gs/common"],
    ),
    Variant(
        "vault-mount-null",
        "vault_kv2",
        VAULT,
        {"mount_point": None, "connections_path": "mn/conns", "variables_path": "mn/vars"},
        {"mount_point": None, "connections_path": "mn/conns", "variables_path": "mn/vars"},
        {"connection": "mn/conns", "variable": "mn/vars", "config": "config"},
        mount_null=True,
    ),
]


def team_plan(variant_index: int, variant: Variant) -> tuple[list[Seed], list[dict[str, Any]]]:
    """Team-scoped and global secrets side by side; lookups by two teams and by none, and ambiguous ids."""
    seeds: list[Seed] = []
    cases: list[dict[str, Any]] = []
    vault = variant.store.startswith("vault")

    def put(kind: str, key: str, team: str | None, text: str) -> None:
        path = variant.path(kind, key, team)
        assert path is not None
        if kind == "connection":
            value: Any = {"conn_uri": f"http://{text}.example"} if vault else f"http://{text}.example"
        else:
            value = {"value": text} if vault else text
        seeds.append(Seed(variant.store, path, value))

    for kind in ("connection", "variable"):
        keys = ids(variant_index, 8, kind, variant.marks)
        for i, key in enumerate(keys):
            put(kind, key, None, f"global-{i}")
            if i % 2 == 0:
                put(kind, key, "team1", f"team1-{i}")
        # amb__id: '_' becomes '-' in a Key Vault name, so it spells the team separator there; amb___id
        # spells the environment variables' one
        keys += ["amb--id", "amb__id", "amb___id", "team1/nested", "absent-t"]
        put(kind, "amb--id", None, "ambiguous")
        put(kind, "amb__id", None, "ambiguous-underscores")
        put(kind, "amb___id", None, "ambiguous-env")
        put(kind, "team1/nested", None, "nested-global")
        for key in keys:
            for team in (None, "team1", "team2"):
                cases.append(
                    {"variant": variant.name, "store": variant.store, "kind": kind, "id": key, "shape": "team"}
                    | ({"team": team} if team else {})
                )
    return seeds, cases


def layout_plan(variant_index: int, variant: Variant) -> tuple[list[Seed], list[dict[str, Any]]]:
    """Path lists (each base path in order, one id in both) and ids that carry their mount."""
    seeds: list[Seed] = []
    cases: list[dict[str, Any]] = []
    for kind in ("connection", "variable"):
        base = variant.layout[kind]
        assert base is not None
        for i, key in enumerate(ids(variant_index, 6, kind)):
            bases = variant.path_list if kind == "connection" and variant.path_list else [base]
            chosen = [bases[i % len(bases)]] + ([bases[-1]] if i == 0 and len(bases) > 1 else [])
            lookup = f"secret/{key}" if variant.mount_null else key
            for n, where in enumerate(chosen):
                text = f"{kind[:4]}-{i}-{n}"
                value = {"conn_uri": f"http://{text}.example"} if kind == "connection" else {"value": text}
                seeds.append(Seed(variant.store, f"{where}/{key}", value))
            for asked in {lookup, key, f"{key}/deeper", f"secret/{key}/x"}:
                cases.append(
                    {"variant": variant.name, "store": variant.store, "kind": kind, "id": asked, "shape": "layout"}
                )
    return seeds, cases


def bad_entry_plan(variant_index: int, variant: Variant) -> tuple[list[Seed], list[dict[str, Any]]]:
    """Good connections beside one that Airflow's Connection refuses, in one file; variables in their own."""
    seeds: list[Seed] = []
    cases: list[dict[str, Any]] = []
    values = {f"good{variant_index}_{i}": f"http://good-{i}.example" for i in range(3)}
    values[f"bad{variant_index}"] = FILE_REFUSED_URIS[0]
    for kind, entries in (("connection", values), ("variable", {f"var{variant_index}_ok": "fine"})):
        for key, value in entries.items():
            seeds.append(Seed(variant.store, key, value, kind=kind))
            shape = "bad-entry" if key.startswith("bad") else "beside-bad-entry"
            cases.append({"variant": variant.name, "store": variant.store, "kind": kind, "id": key, "shape": shape})
    return seeds, cases


def naming_plan(variant_index: int, variant: Variant) -> tuple[list[Seed], list[dict[str, Any]]]:
    """Only the names a layout builds (prefixes, separators, every id shape), with one plain value each: the
    shapes of the values themselves are the full plan's, on the store's default layout."""
    seeds: list[Seed] = []
    cases: list[dict[str, Any]] = []
    for kind in ("connection", "variable", "config"):
        keys = ids(variant_index, 6, kind, variant.marks)
        for i, key in enumerate(keys):
            path = variant.path(kind, key)
            if path is not None:
                text = f"{kind[:4]}-{variant_index}-{i}"
                seeds.append(Seed(variant.store, path, f"http://{text}.example" if kind == "connection" else text))
        for key in [*keys, f"absent{variant_index}_{kind}", "a b", ".."]:
            cases.append({"variant": variant.name, "store": variant.store, "kind": kind, "id": key, "shape": "name"})
    return seeds, cases


def ids(variant_index: int, count: int, kind: str, marks: list[str] = ID_MARKS) -> list[str]:
    """``count`` distinct ids for one variant and kind, cycling through ``marks`` (every allowed one)."""
    tag = {"connection": "C", "variable": "k", "config": "cfg"}[kind]
    out = []
    for i in range(count):
        mark = marks[i % len(marks)]
        out.append(f"{tag}{variant_index}{mark}id_{i}" if i % 3 else f"{tag}{variant_index}_Id{mark}{i}")
    return out


@dataclass
class Seed:
    """One secret to write: the store, its path or name, and what it holds (a string, or a Vault dict)."""

    store: str
    path: str
    value: Any
    access: str = "ok"  # Key Vault and Secret Manager: "denied" (the pod's identity is refused) or "disabled"
    kind: str = ""  # set where a store keeps the kinds apart by file (LocalFilesystemBackend)


def shape(value: Any) -> str:
    """A label for what a store holds, for the documented-difference rules (never the value itself)."""
    if isinstance(value, dict):
        if set(value) == {"value"}:
            inner = value["value"]
            return "str" if isinstance(inner, str) else f"vault-{type(inner).__name__}"
        if "conn_uri" in value and len(value) == 1:
            return "uri"
        return "json:" + ",".join(sorted(value))
    if isinstance(value, str) and value.startswith("{"):
        return "json:" + ",".join(sorted(json.loads(value)))
    return "uri-or-str"


def plan(variant_index: int, variant: Variant) -> tuple[list[Seed], list[dict[str, Any]]]:
    """What to write in the stores for ``variant`` and the lookups to ask of both backends."""
    seeds: list[Seed] = []
    cases: list[dict[str, Any]] = []
    vault = variant.store.startswith("vault")

    # a .env file holds one line per id: URIs only (Airflow reads a JSON line as a URI), and no empty or
    # multi-line values (Airflow refuses the whole file over one)
    env_file = variant.store == "file" and str(variant.kwargs.get("connections_file_path")).endswith(".env")

    def add(kind: str, key: str, value: Any) -> None:
        path = variant.path(kind, key)
        if path is not None and not (env_file and "=" in key):  # a .env key cannot hold '='
            seeds.append(Seed(variant.store, path, value, kind=kind))
        cases.append({"variant": variant.name, "store": variant.store, "kind": kind, "id": key, "shape": shape(value)})

    conn_values: list[Any] = []
    for uri in URIS:
        if variant.store == "file" and uri in FILE_REFUSED_URIS:
            continue  # it would fail the whole file in Airflow (the file-one-bad-entry variant has it)
        conn_values.append({"conn_uri": uri} if vault else uri)
    for fields in JSONS:
        if env_file:
            continue
        if variant.store == "file":
            # Airflow's LocalFilesystemBackend refuses the whole file over one entry with a key that is not a
            # Connection argument: only the entries it takes go in (the others are the other stores' cases).
            if set(fields) <= set(CONNECTION_ARGS) and fields.get("extra") != "not json":  # Airflow 3 refuses it
                conn_values.append(fields)
            continue
        conn_values.append(fields if vault else json.dumps(fields))
    if vault:
        conn_values += [
            {"conn_uri": URIS[0], "description": "uri beside other keys"},
            {"conn_uri": ""},
            # an empty or null conn_uri beside fields: hashicorp 4.8 hands Airflow the whole secret as JSON,
            # conn_uri key included, which Airflow's Connection refuses (TypeError) in both contexts
            {"conn_uri": "", "conn_type": "http", "host": "fields.example"},
            {"conn_uri": None, "conn_type": "http", "host": "fields.example"},
            {"host": "no-type.example"},
        ]
    marks = variant.marks
    for key, value in zip(ids(variant_index, len(conn_values), "connection", marks), conn_values, strict=True):
        add("connection", key, value)
    var_values: list[Any] = [{"value": v} for v in VARIABLES] if vault else list(VARIABLES)
    if env_file:
        var_values = [v for v in var_values if v and "\n" not in v]
    if vault:
        var_values += [{"value": 5}, {"value": {"nested": True}}, {"other": "no value key"}]
    for key, value in zip(ids(variant_index, len(var_values), "variable", marks), var_values, strict=True):
        add("variable", key, value)
    configs = ["cfg-value", "", "postgresql://x"]
    for key, value in zip(ids(variant_index, 3, "config", marks), configs, strict=True):
        add("config", key, {"value": value} if vault else value)
    for kind in ("connection", "variable", "config"):
        for key in [f"absent{variant_index}_{kind}", *REFUSED_IDS]:
            cases.append({"variant": variant.name, "store": variant.store, "kind": kind, "id": key, "shape": "absent"})
    if variant.store in ("azure", "gcp"):
        # Readable by no one: Key Vault answers 403 (RBAC denies the identity, or the secret is disabled);
        # Secret Manager 403 PERMISSION_DENIED (IAM) and 400 FAILED_PRECONDITION (the version is disabled).
        for access in ("denied", "disabled"):
            for kind in ("connection", "variable"):
                key = f"{kind[:4]}-{access}-{variant_index}"
                path = variant.path(kind, key)
                assert path is not None
                seeds.append(Seed(variant.store, path, f"http://{access}.example", access))
                cases.append(
                    {"variant": variant.name, "store": variant.store, "kind": kind, "id": key, "shape": access}
                )
    if variant.path("variable", "up") is not None:
        # Stored beside the layout: an id that climbs out of it reaches this only through the provider.
        add("variable", "up", {"value": "outside"} if vault else "outside")
        cases.append(
            {"variant": variant.name, "store": variant.store, "kind": "variable", "id": "x/../up", "shape": "traversal"}
        )
    return seeds, cases
