"""Encoder-weight downloads against a checkpoint served on 127.0.0.1 (never the internet)."""
import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from samir import encoder_weights as weights
from samir.cli import main
from samir.encoders import build_encoder
from samir.geometry import SAMIRInputError
from samir.encoder_weights import (WeightsChecksumError, WeightsFile, WeightsUnavailableError, download_weights,
                                   resolve_encoder_weights)

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Any connection other than to this machine fails the test."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise AssertionError(f"test tried to reach {address}")
        return real_connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def checkpoint_bytes():
    """A small SAM-layout state dict written with torch.save, larger than one download block."""
    generator = torch.Generator().manual_seed(0)
    state = {"image_encoder.pos_embed": torch.randn(1, 4, 4, 8, generator=generator),
             "image_encoder.blob": torch.randn(450_000, generator=generator)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class CheckpointHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.requests.append(self.headers.get("Range"))
        if self.path != "/ckpt.pth":
            self.send_error(404)
            return
        body, start = server.body, 0
        requested = self.headers.get("Range")
        if requested and server.ranges:
            start = int(requested.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if server.truncate_next:  # announce the whole body, send part of it, hang up
            count, server.truncate_next = server.truncate_next, 0
            self.wfile.write(payload[:count])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(checkpoint_bytes):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CheckpointHandler)
    httpd.body, httpd.requests, httpd.ranges, httpd.truncate_next = checkpoint_bytes, [], True, 0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/ckpt.pth"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def weights_folder(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    monkeypatch.setenv("SAMIR_WEIGHTS_DIR", str(folder))
    monkeypatch.delenv("SAMIR_OFFLINE", raising=False)
    return folder


def use_entry(monkeypatch, url, body, sha256=None, size="auto"):
    entry = WeightsFile("sam_vit_b", "sam_vit_b_test.pth", url, sha256=sha256 or hashlib.sha256(body).hexdigest(),
                        size=len(body) if size == "auto" else size)
    monkeypatch.setitem(weights.REGISTRY, "sam_vit_b", entry)
    return entry


def test_download_lands_atomically_and_is_verified(server, weights_folder, monkeypatch, checkpoint_bytes):
    use_entry(monkeypatch, server.url, checkpoint_bytes)
    dest = weights_folder / "sam_vit_b_test.pth"
    seen = []

    def progress(done, total):
        assert not dest.exists(), "the final name must appear only once the file is complete and verified"
        seen.append((done, total))

    path = download_weights("sam_vit_b", progress=progress, show_progress=False)
    assert path == dest and path.read_bytes() == checkpoint_bytes
    assert not (weights_folder / "sam_vit_b_test.pth.part").exists()
    assert weights.is_verified(path)
    assert seen[-1] == (len(checkpoint_bytes), len(checkpoint_bytes)) and len(seen) >= 2
    assert torch.load(path, weights_only=True)["image_encoder.blob"].shape == (450_000,)


def test_cache_hit_needs_no_server(server, weights_folder, monkeypatch, checkpoint_bytes):
    use_entry(monkeypatch, server.url, checkpoint_bytes)
    first = resolve_encoder_weights("sam_vit_b")  # downloads, with the tqdm bar on stderr
    server.shutdown()
    server.server_close()
    requests = len(server.requests)
    assert resolve_encoder_weights("sam_vit_b") == first
    assert len(server.requests) == requests == 1


def test_wrong_checksum_is_rejected_and_the_file_deleted(server, weights_folder, monkeypatch, checkpoint_bytes):
    use_entry(monkeypatch, server.url, checkpoint_bytes, sha256="0" * 64)
    with pytest.raises(WeightsChecksumError, match="deleted"):
        download_weights("sam_vit_b", show_progress=False, retry_wait=0)
    assert not any(p.name.startswith("sam_vit_b_test.pth") for p in weights_folder.iterdir())


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "restarted"])
def test_truncated_transfer_is_resumed_or_restarted(server, weights_folder, monkeypatch, checkpoint_bytes, ranges):
    use_entry(monkeypatch, server.url, checkpoint_bytes)
    server.ranges = ranges
    server.truncate_next = 300_000
    path = download_weights("sam_vit_b", show_progress=False, retry_wait=0)
    assert path.read_bytes() == checkpoint_bytes
    assert server.requests == [None, "bytes=300000-"]  # the second request asked to resume


def test_unknown_size_and_interrupted_stream_still_verified(server, weights_folder, monkeypatch, checkpoint_bytes):
    use_entry(monkeypatch, server.url, checkpoint_bytes, size=None)
    server.truncate_next = 1000
    assert download_weights("sam_vit_b", show_progress=False, retry_wait=0).read_bytes() == checkpoint_bytes


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_message_says_which_file_to_put_where(weights_folder, monkeypatch, checkpoint_bytes):
    use_entry(monkeypatch, f"http://127.0.0.1:{free_port()}/ckpt.pth", checkpoint_bytes)  # connection refused
    with pytest.raises(WeightsUnavailableError) as info:
        download_weights("sam_vit_b", show_progress=False, retry_wait=0)
    message = str(info.value)
    assert str(weights_folder / "sam_vit_b_test.pth") in message and "--weights PATH" in message
    assert "offline" in message
    assert not (weights_folder / "sam_vit_b_test.pth").exists()


def test_downloads_can_be_forbidden(weights_folder, monkeypatch, checkpoint_bytes):
    use_entry(monkeypatch, "http://127.0.0.1:9/never", checkpoint_bytes)
    monkeypatch.setenv("SAMIR_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="needs its checkpoint file sam_vit_b_test.pth"):
        resolve_encoder_weights("sam_vit_b")
    with pytest.raises(WeightsUnavailableError, match="not in the weights folder"):
        resolve_encoder_weights("sam_vit_b", download=False)


def test_http_error_is_not_retried(server, weights_folder, monkeypatch, checkpoint_bytes):
    use_entry(monkeypatch, server.url.replace("ckpt.pth", "moved.pth"), checkpoint_bytes)
    with pytest.raises(WeightsUnavailableError, match="404"):
        download_weights("sam_vit_b", show_progress=False, retry_wait=0)
    assert len(server.requests) == 1


def test_a_file_placed_by_hand_is_checked_once(weights_folder, monkeypatch, checkpoint_bytes):
    use_entry(monkeypatch, "http://127.0.0.1:9/never", checkpoint_bytes)
    weights_folder.mkdir()
    placed = weights_folder / "sam_vit_b_test.pth"
    placed.write_bytes(checkpoint_bytes[:-1] + b"x")
    with pytest.raises(WeightsChecksumError, match="deleted"):
        resolve_encoder_weights("sam_vit_b", download=False)
    assert not placed.exists()
    placed.write_bytes(checkpoint_bytes)
    assert resolve_encoder_weights("sam_vit_b", download=False) == placed and weights.is_verified(placed)


def test_explicit_path_wins_and_must_exist(tmp_path):
    given = tmp_path / "mine.pth"
    given.write_bytes(b"anything")
    assert resolve_encoder_weights("sam_vit_h", given) == given
    with pytest.raises(SAMIRInputError, match="does not exist"):
        resolve_encoder_weights("sam_vit_h", tmp_path / "missing.pth")
    with pytest.raises(SAMIRInputError, match="no downloadable weights"):
        resolve_encoder_weights("resnet50")


def test_build_encoder_downloads_on_first_use(server, weights_folder, monkeypatch, checkpoint_bytes):
    """No --weights: build_encoder fetches the registry file, then loads it (this one is no real ViT-B)."""
    use_entry(monkeypatch, server.url, checkpoint_bytes)
    with pytest.raises(SAMIRInputError, match="not a Segment Anything ViT image encoder"):
        build_encoder("sam_vit_b", input_size=256)
    assert (weights_folder / "sam_vit_b_test.pth").read_bytes() == checkpoint_bytes
    with pytest.raises(SAMIRInputError, match="multiple of 16"):  # checked before any download
        build_encoder("sam_vit_l", input_size=100)


def test_weights_command_line(server, weights_folder, monkeypatch, checkpoint_bytes, capsys):
    use_entry(monkeypatch, server.url, checkpoint_bytes)
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert str(weights_folder) in out and "sam_vit_b_test.pth" in out and "missing" in out and "medsam_vit_b" in out

    assert main(["weights", "fetch", "sam_vit_b"]) == 0
    assert capsys.readouterr().out.strip() == str(weights_folder / "sam_vit_b_test.pth")
    assert main(["weights", "list"]) == 0
    assert "verified" in capsys.readouterr().out

    assert main(["weights", "verify"]) == 0
    assert "sam_vit_b: OK" in capsys.readouterr().out
    other = weights_folder / "elsewhere.pth"
    other.write_bytes(b"not it")
    assert main(["weights", "verify", "sam_vit_b", "--file", str(other)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["weights", "verify", "sam_vit_l"]) == 1
    assert "MISSING" in capsys.readouterr().out

    assert main(["weights", "fetch", "sam_vit_b", "--force"]) == 0
    assert server.requests == [None, None]
    capsys.readouterr()
    monkeypatch.setenv("SAMIR_OFFLINE", "1")
    assert main(["weights", "fetch", "sam_vit_l"]) == 2
    assert "downloads are disabled" in capsys.readouterr().err
