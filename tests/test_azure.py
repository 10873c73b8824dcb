"""--upload against a real Azurite (started by test.sh), plus unit tests of the parts Azurite cannot show."""

import datetime as dt
import hashlib
import json
import shlex
import socket
import sys

import pytest

import azure_upload
from tests.conftest import API_KEY, SECRET_KEY, assert_no_secrets

DAY = ("--date", "2025-11-01")


def upload_env(azurite, container_name, **extra):
    env = {"AZURE_STORAGE_CONNECTION_STRING": azurite["connection_string"], "AZURE_STORAGE_CONTAINER": container_name}
    env.update(extra)
    return env


def assert_nothing_secret(result, cli, *secrets):
    assert_no_secrets(result, cli)
    for text in (result.stdout, result.stderr, cli.everything_written()):
        for secret in secrets:
            assert secret not in text


def test_upload_puts_each_file_under_a_date_partition_byte_for_byte(cli, azurite, container_name, service):
    result = cli.run("--start", "2025-11-01", "--end", "2025-11-02", "--upload", **upload_env(azurite, container_name))
    assert result.returncode == 0, result.stderr
    container = service.get_container_client(container_name)
    exports = [r for r in cli.manifest() if "bytes" in r]
    uploads = [r for r in cli.manifest() if "blob" in r]
    assert len(exports) == 2 and len(uploads) == 2
    for export, upload in zip(exports, uploads, strict=True):
        day = f"{export['start'][:4]}-{export['start'][4:6]}-{export['start'][6:8]}"
        assert upload["blob"] == f"amplitude/events/date={day}/{export['file']}"
        assert (upload["start"], upload["end"], upload["file"], upload["sha256"]) == (
            export["start"], export["end"], export["file"], export["sha256"])
        blob = container.get_blob_client(upload["blob"])
        assert blob.download_blob().readall() == (cli.data / export["file"]).read_bytes()
        properties = blob.get_blob_properties()
        assert properties.content_settings.content_type == "application/json"
        assert properties.content_settings.content_encoding is None
        assert properties.metadata == {
            "window_start": export["start"], "window_end": export["end"], "events": str(export["events"]),
            "sha256": export["sha256"],
        }
    assert all((cli.data / r["file"]).exists() for r in exports)
    assert_nothing_secret(result, cli, azurite["key"])


def test_jsonl_gzip_content_settings_and_a_custom_prefix(cli, azurite, container_name, service):
    result = cli.run(*DAY, "--upload", "--format", "jsonl", "--gzip", "--blob-prefix", "/raw/amp/",
                     **upload_env(azurite, container_name))
    assert result.returncode == 0, result.stderr
    upload = [r for r in cli.manifest() if "blob" in r][0]
    assert upload["blob"] == f"raw/amp/date=2025-11-01/{upload['file']}"
    blob = service.get_container_client(container_name).get_blob_client(upload["blob"])
    properties = blob.get_blob_properties()
    assert properties.content_settings.content_type == "application/x-ndjson"
    assert properties.content_settings.content_encoding == "gzip"
    assert blob.download_blob(decompress=False).readall() == (cli.data / upload["file"]).read_bytes()


def test_a_blob_that_already_holds_the_same_bytes_is_not_sent_again(cli, azurite, container_name, service):
    env = upload_env(azurite, container_name)
    assert cli.run(*DAY, "--upload", **env).returncode == 0
    upload = [r for r in cli.manifest() if "blob" in r][0]
    blob = service.get_container_client(container_name).get_blob_client(upload["blob"])
    etag = blob.get_blob_properties().etag
    manifest = cli.data / "manifest.jsonl"
    manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines() if '"blob"' not in line))
    result = cli.run(*DAY, "--upload", **env)
    assert result.returncode == 0, result.stderr
    assert "Already uploaded (same sha256)" in result.stderr
    assert blob.get_blob_properties().etag == etag
    assert len([r for r in cli.manifest() if "blob" in r]) == 1
    again = cli.run(*DAY, "--upload", **env)
    assert "Uploading" not in again.stderr and "Already uploaded" not in again.stderr


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_storage_down_keeps_the_export_and_the_next_run_sends_it(cli, azurite, container_name, service, standin):
    down = azurite["connection_string"].replace(
        azurite["account_url"].rsplit("/", 1)[0], f"http://127.0.0.1:{closed_port()}")
    result = cli.run(*DAY, "--upload", **upload_env(azurite, container_name, AZURE_STORAGE_CONNECTION_STRING=down))
    assert result.returncode == 1
    assert f"cannot reach Azure Blob Storage for account {azurite['account']}, container {container_name}" in result.stderr
    assert "next --upload run sends them" in result.stderr
    export = cli.manifest()[0]
    assert (cli.data / export["file"]).stat().st_size == export["bytes"]
    assert not any("blob" in r for r in cli.manifest())
    assert_nothing_secret(result, cli, azurite["key"])
    standin.requests.clear()
    result = cli.run(*DAY, "--upload", **upload_env(azurite, container_name))
    assert result.returncode == 0, result.stderr
    assert standin.requests == []
    assert "1 file(s) exported earlier went through the upload stage" in result.stderr
    blob_name = [r for r in cli.manifest() if "blob" in r][0]["blob"]
    blob = service.get_container_client(container_name).get_blob_client(blob_name)
    assert blob.download_blob().readall() == (cli.data / export["file"]).read_bytes()


def test_a_rejected_key_fails_naming_account_and_container_only(cli, azurite, container_name):
    wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmc="
    wrong = azurite["connection_string"].replace(azurite["key"], wrong_key)
    result = cli.run(*DAY, "--upload", **upload_env(azurite, container_name, AZURE_STORAGE_CONNECTION_STRING=wrong))
    assert result.returncode == 1
    assert (f"Azure rejected the credentials (connection string) for account {azurite['account']}, "
            f"container {container_name}") in result.stderr
    assert len(cli.outputs()) == 1
    assert "Traceback" not in result.stderr
    assert_nothing_secret(result, cli, wrong_key, azurite["key"])


def test_a_container_sas_uploads_into_the_existing_container(cli, azurite, container_name, service):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    service.create_container(container_name)
    sas = generate_container_sas(
        azurite["account"], container_name, account_key=azurite["key"],
        permission=ContainerSasPermissions(read=True, write=True, create=True),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    env = {"AZURE_STORAGE_ACCOUNT_URL": azurite["account_url"], "AZURE_STORAGE_SAS_TOKEN": "?" + sas,
           "AZURE_STORAGE_CONTAINER": container_name}
    result = cli.run(*DAY, "--upload", **env)
    assert result.returncode == 0, result.stderr
    upload = [r for r in cli.manifest() if "blob" in r][0]
    blob = service.get_container_client(container_name).get_blob_client(upload["blob"])
    assert blob.download_blob().readall() == (cli.data / upload["file"]).read_bytes()
    signature = [part for part in sas.split("&") if part.startswith("sig=")][0]
    assert_nothing_secret(result, cli, signature, sas)


def test_upload_without_storage_settings_is_a_usage_error_before_any_export(cli, standin):
    result = cli.run(*DAY, "--upload")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --upload needs AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_URL "
        "(with AZURE_STORAGE_SAS_TOKEN, or alone for DefaultAzureCredential)"
    ]
    assert standin.requests == [] and not cli.data.exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"AZURE_STORAGE_CONNECTION_STRING": "x", "AZURE_STORAGE_CONTAINER": "Bad_Name"}, "container name 'Bad_Name'"),
        ({"AZURE_STORAGE_CONNECTION_STRING": "garbage"}, "neither AccountName nor BlobEndpoint"),
        (
            {"AZURE_STORAGE_CONNECTION_STRING": "AccountName=acct;AccountKey=a2V5;Foo"},
            "the connection string for Azure is incomplete or malformed",
        ),
        ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=acct;AccountKey=sig=abc!"},
         "AZURE_STORAGE_CONNECTION_STRING: its AccountKey is empty or not base64"),
        ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=acct;AccountKey="}, "its AccountKey is empty or not base64"),
        # The Blob SDK reads field names in any case: so does the check for plain http.
        ({"AZURE_STORAGE_CONNECTION_STRING": "blobendpoint=http://10.1.2.3/acct;AccountName=acct;AccountKey=a2V5"},
         "AZURE_STORAGE_CONNECTION_STRING: the credentials and the data would travel unencrypted to 10.1.2.3"),
        ({"AZURE_STORAGE_CONNECTION_STRING":
          "BlobEndpoint=https://acct.blob.core.windows.net;AccountName=acct;AccountKey=a2V5;BLOBENDPOINT=http://10.1.2.3"},
         "would travel unencrypted to 10.1.2.3"),
        ({"AZURE_STORAGE_ACCOUNT_URL": "https://acct.blob.core.windows.net/?sv=1&sig=abc"}, "no query, no token"),
        ({"AZURE_STORAGE_ACCOUNT_URL": "https://[acct.blob.core.windows.net"},
         "AZURE_STORAGE_ACCOUNT_URL: expected https://<account>.blob.core.windows.net"),
        ({"AZURE_STORAGE_ACCOUNT_URL": "https://acct.blob.core.windows.net:99999"},
         "AZURE_STORAGE_ACCOUNT_URL: expected https://<account>.blob.core.windows.net"),
        ({"AZURE_STORAGE_ACCOUNT_URL": "http://acct.blob.core.windows.net", "AZURE_STORAGE_SAS_TOKEN": "sv=1&sig=abc"},
         "AZURE_STORAGE_ACCOUNT_URL: the credentials and the data would travel unencrypted to acct.blob.core.windows.net"),
        ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=acct;AccountKey=a2V5;BlobEndpoint=http://10.1.2.3/acct"},
         "AZURE_STORAGE_CONNECTION_STRING: the credentials and the data would travel unencrypted to 10.1.2.3"),
        ({"AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=a2V5"},
         "would travel unencrypted to acct.blob.core.windows.net"),
        ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=a2V5", "AZURE_BLOB_PREFIX": "lake/../other"},
         "blob prefix 'lake/../other': use names separated by single slashes"),
        ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=a2V5", "AZURE_BLOB_PREFIX": "lake//events"},
         "blob prefix 'lake//events'"),
        ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=a2V5", "AZURE_BLOB_PREFIX": "lake\\events"},
         "blob prefix 'lake\\\\events'"),
    ],
)
def test_bad_storage_settings_are_usage_errors(cli, standin, env, message):
    result = cli.run(*DAY, "--upload", **env)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "sig=abc" not in result.stderr and standin.requests == []


def test_upload_without_the_azure_packages_says_which_file_to_install(cli, standin, tmp_path):
    shadow = tmp_path / "shadow" / "azure"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    pythonpath = str(tmp_path / "shadow")
    result = cli.run(*DAY, "--upload", AZURE_STORAGE_CONNECTION_STRING="AccountName=a", PYTHONPATH=pythonpath)
    assert result.returncode == 2
    install = shlex.join([sys.executable, "-m", "pip", "install", "-r", str(cli.project / "requirements-azure.txt")])
    assert result.stderr.strip() == f"Error: --upload needs the Azure packages: {install}"
    assert standin.requests == []


def test_an_account_url_alone_authenticates_with_default_azure_credential(monkeypatch):
    import azure.identity

    class FakeCredential:
        def get_token(self, *scopes, **kwargs):
            raise AssertionError("no token is asked for while building the client")

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", FakeCredential)
    target = azure_upload.target_from({"AZURE_STORAGE_ACCOUNT_URL": "https://acct.blob.core.windows.net"},
                                      "amplitude", "amplitude/events")
    assert target.method == "DefaultAzureCredential" and target.account == "acct"
    client = azure_upload.container_client(target)
    assert isinstance(client.credential, FakeCredential)
    assert client.url == "https://acct.blob.core.windows.net/amplitude"


@pytest.mark.parametrize(
    "env, method",
    [
        ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=acct;AccountKey=a2V5", "AZURE_STORAGE_ACCOUNT_URL": "https://x"},
         "connection string"),
        ({"AZURE_STORAGE_ACCOUNT_URL": "https://acct.blob.core.windows.net", "AZURE_STORAGE_SAS_TOKEN": "?sv=1&sig=s"},
         "SAS token"),
    ],
)
def test_first_credentials_found_win(env, method):
    target = azure_upload.target_from(env, "amplitude", "p")
    assert target.method == method and target.account == "acct"
    assert "sig=s" not in repr(target) and "AccountKey" not in repr(target)


@pytest.mark.parametrize(
    "prefix, start, name, expected",
    [
        ("amplitude/events", "20251101T00", "f.json", "amplitude/events/date=2025-11-01/f.json"),
        ("", "20240229T12", "f.json.gz", "date=2024-02-29/f.json.gz"),
        ("a", "20251231T23", "f.jsonl", "a/date=2025-12-31/f.jsonl"),
    ],
)
def test_blob_names(prefix, start, name, expected):
    target = azure_upload.Target("amplitude", prefix, "https://acct.blob.core.windows.net")
    assert target.blob_name(start, name) == expected


def test_secrets_of_the_export_stay_out_of_uploads(cli, azurite, container_name, service):
    result = cli.run(*DAY, "--upload", **upload_env(azurite, container_name))
    assert result.returncode == 0
    container = service.get_container_client(container_name)
    for blob in container.list_blobs(include=["metadata"]):
        text = json.dumps(blob.metadata)
        assert API_KEY not in text and SECRET_KEY not in text


def test_the_field_rules_policy_goes_into_the_blobs_metadata(cli, azurite, container_name, service):
    key = "a-hash-key-of-more-than-32-characters"
    result = cli.run(*DAY, "--upload", "--drop-fields", "ip_address,user_properties.plan", "--hash-fields", "user_id",
                     AMP_HASH_KEY=key, **upload_env(azurite, container_name))
    assert result.returncode == 0, result.stderr
    export, upload = cli.manifest()
    blob = service.get_container_client(container_name).get_blob_client(upload["blob"])
    metadata = blob.get_blob_properties().metadata
    assert json.loads(metadata["policy"]) == export["policy"] == {
        "dropped": ["ip_address", "user_properties.plan"], "hashed": ["user_id"], "key_id": export["policy"]["key_id"],
    }
    assert blob.download_blob().readall() == (cli.data / export["file"]).read_bytes()
    assert_nothing_secret(result, cli, azurite["key"], key)


NOW = dt.datetime(2025, 11, 7, 3, 30, tzinfo=dt.UTC)


def test_an_upload_never_replaces_a_blob_that_holds_other_bytes(cli, azurite, container_name, service, tmp_path):
    """Two data folders, one container and prefix, the same day in the same minute: the same blob name."""
    env = upload_env(azurite, container_name)
    first = cli.run(*DAY, "--upload", now=NOW, **env)
    assert first.returncode == 0, first.stderr
    (upload,) = [r for r in cli.manifest() if "blob" in r]
    blob = service.get_container_client(container_name).get_blob_client(upload["blob"])
    before = blob.download_blob().readall()
    second = cli.run(*DAY, "--upload", "--drop-fields", "city", "--data-dir", str(tmp_path / "other"), now=NOW, **env)
    assert second.returncode == 1
    assert f"blob {upload['blob']} in container {container_name} already holds other bytes" in second.stderr
    assert blob.download_blob().readall() == before
    other = [json.loads(line) for line in (tmp_path / "other" / "manifest.jsonl").read_text().splitlines()]
    assert [r for r in other if "blob" in r] == []  # still pending: not recorded as uploaded


def test_a_file_changed_after_export_is_not_uploaded_and_its_hours_are_exported_again(cli, azurite, container_name,
                                                                                       service, standin):
    assert cli.run(*DAY).returncode == 0
    (record,) = cli.manifest()
    path = cli.data / record["file"]
    content = bytearray(path.read_bytes())
    content[10:16] = b"XXXXXX"  # same size, other bytes
    path.write_bytes(bytes(content))
    standin.requests.clear()
    result = cli.run(*DAY, "--upload", **upload_env(azurite, container_name))
    assert result.returncode == 0, result.stderr
    assert f"{record['file']}: its bytes no longer match the sha256 recorded when it was exported; not uploaded" \
        in result.stderr
    assert len(standin.requests) == 1  # exported again
    blobs = list(service.get_container_client(container_name).list_blobs(include=["metadata"]))
    (new_record,) = [r for r in cli.manifest() if "bytes" in r and r["file"] != record["file"]]
    assert [b.name.rsplit("/", 1)[1] for b in blobs] == [new_record["file"]]
    assert blobs[0].metadata["sha256"] == new_record["sha256"] == hashlib.sha256(
        (cli.data / new_record["file"]).read_bytes()).hexdigest()


def test_a_policy_too_long_for_blob_metadata_goes_in_compact_form(cli, azurite, container_name, service):
    dropped = ",".join(f"event_properties.field_{n:03d}" for n in range(400))
    result = cli.run(*DAY, "--upload", "--drop-fields", dropped, **upload_env(azurite, container_name))
    assert result.returncode == 0, result.stderr
    export, upload = cli.manifest()
    metadata = service.get_container_client(container_name).get_blob_client(upload["blob"]).get_blob_properties().metadata
    assert "policy" not in metadata and metadata["policy_fields"] == "400 dropped, 0 hashed"
    canonical = json.dumps(export["policy"], separators=(",", ":")).encode()
    assert metadata["policy_sha256"] == hashlib.sha256(canonical).hexdigest()
