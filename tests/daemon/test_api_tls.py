"""TLS and mutual TLS on the daemon's HTTP and gRPC listeners, driven through the official clients
(``tritonclient.http`` with ``ssl=True``, ``tritonclient.grpc`` with root certificates and a client
key pair): TLS serves and still wants a token; with ``client_ca`` a client without a certificate the
CA signed is refused at the handshake, and one with such a certificate needs no token.
"""

from __future__ import annotations

import signal
import ssl
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import edge_sdk

from .conftest import DaemonProcess, fusion_inputs, write_config

pytestmark = pytest.mark.requires("tritonclient", "grpc", "gevent")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory, make_certs) -> Path:
    """ca.crt, server.crt/.key (127.0.0.1), client cam.crt/.key; other/ holds a foreign CA's client."""
    folder = tmp_path_factory.mktemp("api-certs")
    make_certs(folder, clients=("cam",))
    (folder / "other").mkdir()
    make_certs(folder / "other", clients=("cam",))
    return folder


def client_context(certs: Path, cert: Path | None) -> ssl.SSLContext:
    """Trusts the test CA; presents ``cert`` (and the key beside it) when given."""
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if cert is not None:
        context.load_cert_chain(str(cert), str(cert.with_suffix(".key")))
    return context


def start(folder: Path, release: Path, certs: Path, mutual: bool) -> DaemonProcess:
    tls = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    if mutual:
        tls["client_ca"] = str(certs / "ca.crt")
    proc = DaemonProcess(write_config(folder, [{"name": "fusion", "release": str(release), "precision": "fp32"}],
                                      api={}, http={"port": 0, "tls": tls}, grpc={"port": 0, "tls": tls}))
    try:
        port_file, deadline = folder / "state" / "http.port", time.monotonic() + 60
        context = client_context(certs, certs / "cam.crt" if mutual else None)
        while True:  # (DaemonProcess.wait_ready speaks plain HTTP)
            assert proc.proc.poll() is None, proc.logs()
            assert time.monotonic() < deadline, f"not ready within 60 s: {proc.logs()}"
            if port_file.exists() and port_file.read_text().strip():
                proc.address = f"127.0.0.1:{port_file.read_text().strip()}"
                try:
                    if httpx.get(f"https://{proc.address}/v2/health/ready", verify=context, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        proc.grpc_address = f"127.0.0.1:{(folder / 'state' / 'grpc.port').read_text().strip()}"
        tokens = folder / "state" / "api-tokens"
        assert tokens.exists() != mutual  # with mutual TLS on both listeners no token is needed, so none is made
        proc.token = tokens.read_text().split()[-1] if tokens.exists() else "none"
    except BaseException:
        proc.kill()
        raise
    return proc


@pytest.fixture(scope="module")
def reference(fusion_release: Path):
    model = edge_sdk.EdgeModel.load(fusion_release, profile="generic-x86_64", precision="fp32", monitor=False)
    yield model.run(fusion_inputs(4))["scores"]
    model.close()


@pytest.fixture(scope="module", params=["tls", "mutual_tls"])
def daemon(request, fusion_release: Path, certs: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = start(tmp_path_factory.mktemp(request.param), fusion_release, certs, request.param == "mutual_tls")
    proc.mutual = request.param == "mutual_tls"
    yield proc
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.kill()


def http_client(daemon, certs: Path, cert: Path | None):
    import tritonclient.http as th

    options = {"ca_certs": str(certs / "ca.crt")}
    if cert is not None:
        options.update(certfile=str(cert.with_suffix(".crt")), keyfile=str(cert.with_suffix(".key")))
    return th.InferenceServerClient(daemon.address, ssl=True, ssl_options=options)


def grpc_client(daemon, certs: Path, cert: Path | None):
    import tritonclient.grpc as tg

    keys = {"private_key": str(cert.with_suffix(".key")), "certificate_chain": str(cert.with_suffix(".crt"))} if cert else {}
    return tg.InferenceServerClient(daemon.grpc_address, ssl=True, root_certificates=str(certs / "ca.crt"), **keys)


def infer_http(client, **kwargs):
    import tritonclient.http as th

    inputs = []
    for name, array in fusion_inputs(4).items():
        item = th.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    return client.infer("fusion", inputs, **kwargs).as_numpy("scores")


def infer_grpc(client, **kwargs):
    import tritonclient.grpc as tg

    inputs = []
    for name, array in fusion_inputs(4).items():
        item = tg.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array)
        inputs.append(item)
    return client.infer("fusion", inputs, **kwargs).as_numpy("scores")


def test_both_transports_serve_over_tls(daemon, certs: Path, reference) -> None:
    from tritonclient.utils import InferenceServerException

    cert = certs / "cam.crt" if daemon.mutual else None
    token = {"authorization": f"Bearer {daemon.token}"}
    np.testing.assert_array_equal(infer_http(http_client(daemon, certs, cert), headers=dict(token)), reference)
    np.testing.assert_array_equal(infer_grpc(grpc_client(daemon, certs, cert), headers=dict(token)), reference)
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
        httpx.get(f"http://{daemon.address}/v2/health/live", timeout=5)
    if daemon.mutual:  # the client certificate is the authentication: no token
        np.testing.assert_array_equal(infer_http(http_client(daemon, certs, cert)), reference)
        np.testing.assert_array_equal(infer_grpc(grpc_client(daemon, certs, cert)), reference)
        return
    # TLS alone authenticates nobody: a token is still needed.
    with pytest.raises(InferenceServerException) as err:
        infer_http(http_client(daemon, certs, None))
    assert err.value.status() == "401"
    with pytest.raises(InferenceServerException) as err:
        infer_grpc(grpc_client(daemon, certs, None))
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"


@pytest.mark.parametrize("daemon", ["mutual_tls"], indirect=True)
def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(daemon, certs: Path) -> None:
    from geventhttpclient.response import HTTPConnectionClosed
    from tritonclient.utils import InferenceServerException

    token = {"authorization": f"Bearer {daemon.token}"}
    for cert in (None, certs / "other" / "cam.crt"):  # none, or one a foreign CA signed: a token does not help
        with pytest.raises((ssl.SSLError, ConnectionError, HTTPConnectionClosed, InferenceServerException)):
            http_client(daemon, certs, cert).get_server_metadata(headers=dict(token))
        with pytest.raises(httpx.HTTPError):  # not even the probes: the handshake fails
            httpx.get(f"https://{daemon.address}/v2/health/live", verify=client_context(certs, cert), timeout=5)
        with pytest.raises(InferenceServerException) as err:
            grpc_client(daemon, certs, cert).get_server_metadata(headers=dict(token))
        assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert httpx.get(f"https://{daemon.address}/v2/health/live", verify=client_context(certs, certs / "cam.crt"),
                     timeout=5).status_code == 200
