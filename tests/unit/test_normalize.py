"""Connection values normalised to the JSON Airflow accepts, parsed by Airflow's URI rules."""

from __future__ import annotations

import json

import pytest

from broker.backends.base import BackendError, Kind
from broker.normalize import connection_fields, normalise

CASES = [
    (
        "postgres://user:p%40ss%2Fw%3Ard%23@db.local:5432/airflow",
        {
            "conn_type": "postgres",
            "host": "db.local",
            "login": "user",
            "password": "p@ss/w:rd#",
            "schema": "airflow",
            "port": 5432,
        },
    ),
    ("postgresql://u@h/s", {"conn_type": "postgres", "host": "h", "login": "u", "schema": "s"}),
    (
        "google-cloud-platform://?key_path=%2Fkeys%2Fkey.json&project=p",
        {"conn_type": "google_cloud_platform", "extra": {"key_path": "/keys/key.json", "project": "p"}},
    ),
    ("http://h?__extra__=%7B%22a%22%3A+%5B1%2C+2%5D%7D", {"conn_type": "http", "host": "h", "extra": {"a": [1, 2]}}),
    ("spark://spark://master:7077", {"conn_type": "spark", "host": "spark://master", "port": 7077}),
    ("aws://", {"conn_type": "aws"}),
    ("mysql://h%2Fsock:3306", {"conn_type": "mysql", "host": "h/sock", "port": 3306}),
]


@pytest.mark.parametrize(("uri", "expected"), CASES)
def test_uri(uri: str, expected: dict[str, object]) -> None:
    assert connection_fields(uri, "t") == expected


def test_json_string_and_mapping() -> None:
    fields = {"conn_type": "postgres", "host": "h", "port": "5432", "extra": '{"sslmode": "require"}', "conn_id": "x"}
    out = connection_fields(json.dumps(fields), "t")
    assert out == {"conn_type": "postgres", "host": "h", "port": 5432, "extra": {"sslmode": "require"}}
    assert connection_fields(fields, "t") == out


def test_conn_uri_form() -> None:
    assert connection_fields({"conn_uri": "http://a:b@h"}, "t") == {
        "conn_type": "http",
        "host": "h",
        "login": "a",
        "password": "b",
    }


def test_extra_dejson_alias() -> None:
    assert connection_fields({"conn_type": "x", "extra_dejson": {"k": 1}}, "t")["extra"] == {"k": 1}


@pytest.mark.parametrize("bad", ["not a uri", "{not json", "[1,2]", "a://b://c://d", "http://h:notaport"])
def test_bad_values_raise_without_echoing(bad: str) -> None:
    with pytest.raises(BackendError) as info:
        connection_fields(bad, "vault:connections/x")
    assert bad not in str(info.value)
    assert "vault:connections/x" in str(info.value)


def test_unknown_field_is_an_error_not_silence() -> None:
    with pytest.raises(BackendError, match="unknown connection field"):
        connection_fields({"conn_type": "x", "hostname": "h"}, "t")


def test_normalised_connection_round_trips_through_airflow_rules() -> None:
    value = normalise(Kind.CONNECTION, "postgres://u:p%40ss@h:1/s?sslmode=require", "t")
    assert json.loads(value) == {
        "conn_type": "postgres",
        "host": "h",
        "login": "u",
        "password": "p@ss",
        "schema": "s",
        "port": 1,
        "extra": {"sslmode": "require"},
    }


def test_variables_pass_through_and_mappings_become_json() -> None:
    assert normalise(Kind.VARIABLE, "plain", "t") == "plain"
    assert json.loads(normalise(Kind.VARIABLE, {"a": 1}, "t")) == {"a": 1}


def test_provider_form_is_what_the_provider_hands_airflow() -> None:
    from broker.backends.base import Kind
    from broker.normalize import provider_form

    uri = "postgres://u:p%40ss@h:5432/db?ssl=true&timeout=5"
    assert provider_form(Kind.CONNECTION, uri) == uri  # verbatim: Airflow parses it in its own context
    stored = '{"conn_type": "http", "host": "", "extra": "{\\"a\\": 1}"}'
    assert provider_form(Kind.CONNECTION, stored) == stored
    assert json.loads(provider_form(Kind.CONNECTION, {"conn_type": "x", "port": "5"}) or "") == {
        "conn_type": "x",
        "port": "5",
    }
    # keys Airflow's Connection refuses (the broker accepts them): the normalised JSON is served
    assert provider_form(Kind.CONNECTION, {"conn_id": "a", "conn_type": "x"}) is None
    assert provider_form(Kind.CONNECTION, '{"extra_dejson": {}}') is None
    assert provider_form(Kind.VARIABLE, "v") is None
