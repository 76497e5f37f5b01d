"""weights.py: the registry agrees with pyiqa / torchvision / timm, listing never touches the network, and
`--download` against a local HTTP server (127.0.0.1): a good file lands in place and verifies; a hash
mismatch, a truncated transfer or an unreachable server leave nothing written and say so in one line."""
import dataclasses
import hashlib
import http.server
import io
import re
import socket
import threading
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import torchvision
from test_rehearsal import write_hf_snapshot

import nriqa_sr
import stops
import weights

REGISTRY = {w.name: w for w in weights.REGISTRY}


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Empty torch / Hugging Face caches in tmp; any connection but to 127.0.0.1 is refused."""
    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def local_only(sock, address):
        if address[0] != '127.0.0.1':
            raise ConnectionRefusedError(f'test: network access to {address} refused')
        return connect(sock, address)

    def local_lookup(host, *args, **kwargs):
        if host != '127.0.0.1':
            raise socket.gaierror(socket.EAI_NONAME, f'test: lookup of {host} refused')
        return lookup(host, *args, **kwargs)
    monkeypatch.setattr(socket.socket, 'connect', local_only)
    monkeypatch.setattr(socket, 'getaddrinfo', local_lookup)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)


def real_format_bytes(seed=0):
    """An LPIPS-format file (the five lin layers of pyiqa's LPIPS, legacy serialization), random values."""
    torch.manual_seed(seed)
    state = {f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate([64, 192, 384, 256, 256])}
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


@pytest.fixture
def server():
    """A 127.0.0.1 HTTP server: `routes[path] = (body, declared_length)`; a declared length longer than
    the body is a transfer the server cuts short."""
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in routes:
                self.send_error(404)
                return
            body, length = routes[self.path]
            self.send_response(200)
            self.send_header('Content-Length', str(length))
            self.end_headers()
            self.wfile.write(body)  # then the handler returns and the server closes the connection

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield routes, f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()


def served(routes, base, w, body, length=None, **fields):
    """`w` redirected to the local server, which serves `body` for it."""
    routes[f'/{w.file}'] = (body, len(body) if length is None else length)
    return dataclasses.replace(w, url=f'{base}/{w.file}', **fields)


def folder_listing(w):
    folder = weights.location(w).parent
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- the registry
def test_registry_agrees_with_the_libraries_that_load_the_files():
    """URLs and names as pyiqa 0.1.16, torchvision and timm have them; a torch-hub name's hash is the prefix checked."""
    import pyiqa
    import pyiqa.archs.dists_arch as dists
    import pyiqa.archs.lpips_arch as lpips
    import pyiqa.archs.musiq_arch as musiq
    import pyiqa.archs.nima_arch as nima
    import pyiqa.archs.paq2piq_arch as paq2piq
    import pyiqa.archs.stlpips_arch as stlpips
    import pyiqa.archs.topiq_arch as topiq
    import timm
    pyiqa_urls = {'musiq': musiq.default_model_urls['koniq10k'], 'lpips': lpips.default_model_urls['0.1_alex'],
                  'dists': dists.default_model_urls['url'], 'nima': nima.default_model_urls['inception_resnet_v2-ava'],
                  'topiq_nr': topiq.default_model_urls['cfanet_nr_koniq_res50'],
                  'paq2piq': paq2piq.default_model_urls['url'],
                  'stlpips': stlpips.default_model_urls['alex_shift_tolerant']}
    for name, url in pyiqa_urls.items():
        assert REGISTRY[name].file == url.rsplit('/', 1)[1]
        assert REGISTRY[name].url == url or name == 'stlpips'  # fetched from pyiqa's own source, at a commit
    enums = {'vgg19': torchvision.models.VGG19_Weights, 'vgg16': torchvision.models.VGG16_Weights,
             'alexnet': torchvision.models.AlexNet_Weights, 'resnet18': torchvision.models.ResNet18_Weights}
    for name, enum in enums.items():
        url = enum.IMAGENET1K_V1.url
        assert REGISTRY[name].url == url and REGISTRY[name].file == url.rsplit('/', 1)[1]
    assert weights.VGG19_FILE == REGISTRY['vgg19'].file
    for name, arch in (('inception_resnet_v2', 'inception_resnet_v2'), ('resnet50', 'resnet50')):
        assert REGISTRY[name].file == timm.models.get_pretrained_cfg(arch).hf_hub_id
    qalign = Path(pyiqa.__file__).parent / 'archs' / 'qalign_arch.py'  # importing it needs icecream
    assert f"'{REGISTRY['one-align'].file}'" in qalign.read_text()
    for w in weights.REGISTRY:
        tag = re.search(r'-([0-9a-f]{8,})\.', w.file)
        assert bool(w.sha256 or w.git_sha1) == (w.folder != 'hf'), w.name  # every file has a check
        assert tag is None or w.sha256.startswith(tag.group(1)), w.name


def test_a_name_selects_a_file_or_everything_a_metric_needs():
    assert [w.name for w in weights.select(['nima'])] == ['nima', 'inception_resnet_v2']
    assert [w.name for w in weights.select(['lpips', 'vgg19'])] == ['lpips', 'vgg19', 'alexnet']
    assert [w.name for w in weights.select(['qalign'])] == ['one-align']
    assert weights.select([]) == list(weights.REGISTRY)
    with pytest.raises(ValueError, match="unknown NAME 'nope'; choose from alexnet, dists"):
        weights.select(['nope'])


# ----------------------------------------------------------------------------- listing
def test_listing_is_offline_and_names_place_state_size_and_url(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(socket.socket, 'connect', lambda *a: pytest.fail('listing touched the network'))
    path = weights.location(REGISTRY['vgg16'])
    path.parent.mkdir(parents=True)
    path.write_bytes(b'x' * 3 * 2**20)
    write_hf_snapshot(tmp_path / 'hf', 'timm/resnet50.a1_in1k', {'config.json': b'{}', 'model.safetensors': b'0'})
    assert nriqa_sr.main(['weights']) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.split()[0] in REGISTRY}
    assert lines[0].split()[:2] == ['NAME', 'STATE'] and len(rows) == len(REGISTRY)
    assert lines[-1].startswith('fetch what is missing: python nriqa_sr.py weights --download')
    for w in weights.REGISTRY:
        state = 'present' if w.name in ('vgg16', 'resnet50') else 'MISSING'
        assert rows[w.name].split()[1] == state and rows[w.name].endswith(str(weights.location(w)))
        assert f'from {w.url}' in lines[lines.index(rows[w.name]) + 1]
    assert '3.0 MB' in rows['vgg16']
    assert rows['vgg16'].endswith(str(tmp_path / 'torch' / 'hub' / 'checkpoints' / 'vgg16-397923af.pth'))


def test_partial_hugging_face_repository_is_missing(tmp_path):
    write_hf_snapshot(tmp_path / 'hf', 'timm/resnet50.a1_in1k', {'config.json': b'{}'})  # no model.safetensors
    assert not weights.is_present(REGISTRY['resnet50'])
    assert weights.missing_weights('topiq_nr') == [weights.location(REGISTRY['topiq_nr']),
                                                   tmp_path / 'hf' / 'models--timm--resnet50.a1_in1k']


# ----------------------------------------------------------------------------- download
def test_good_file_lands_in_place_and_verifies(server):
    routes, base = server
    body = real_format_bytes()
    w = served(routes, base, REGISTRY['lpips'], body, sha256=hashlib.sha256(body).hexdigest())
    assert weights.download([w], progress=False) == [weights.location(w)]
    assert weights.location(w).read_bytes() == body and folder_listing(w) == [w.file]  # no temp file left
    assert torch.load(weights.location(w), weights_only=True).keys() == torch.load(io.BytesIO(body)).keys()
    assert weights.download([w], progress=False) == []  # present: not fetched again


def test_git_blob_hash_is_checked(server):
    routes, base = server
    body = real_format_bytes(1)
    git_sha1 = hashlib.sha1(b'blob %d\0' % len(body) + body).hexdigest()
    good = served(routes, base, REGISTRY['stlpips'], body, git_sha1=git_sha1)
    bad = dataclasses.replace(good, git_sha1='0' * 40)
    with pytest.raises(ValueError, match=f'git blob sha1 {git_sha1} is not 0000') as err:
        weights.fetch_file(bad, progress=False)
    assert '\n' not in str(err.value) and folder_listing(good) == []
    weights.fetch_file(good, progress=False)
    assert weights.location(good).read_bytes() == body


def test_hash_mismatch_leaves_nothing(server):
    routes, base = server
    w = served(routes, base, REGISTRY['lpips'], real_format_bytes())  # the registry's hash: LPIPS's real one
    with pytest.raises(ValueError) as err:
        weights.download([w], progress=False)
    message = str(err.value)
    assert '\n' not in message and message.startswith(f'{w.url}: hash mismatch') and 'nothing written' in message
    assert folder_listing(w) == []


def test_truncated_transfer_leaves_nothing(server):
    routes, base = server
    body = real_format_bytes()
    w = served(routes, base, REGISTRY['musiq'], body[:1000], length=len(body), sha256=hashlib.sha256(body).hexdigest())
    with pytest.raises(ValueError) as err:
        weights.download([w], progress=False)
    message = str(err.value)
    assert '\n' not in message and f'truncated transfer, 1000 of {len(body)} bytes' in message
    assert str(weights.location(w)) in message and folder_listing(w) == []


def test_unreachable_server_names_the_url_and_where_to_put_the_file(server):
    routes, base = server
    w = served(routes, base, REGISTRY['vgg19'], b'')
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(('127.0.0.1', 0))
        closed = dataclasses.replace(w, url=f'http://127.0.0.1:{probe.getsockname()[1]}/{w.file}')
    for bad in (closed, dataclasses.replace(w, url=f'{base}/not-there.pth')):
        with pytest.raises(ValueError) as err:
            weights.download([bad], progress=False)
        message = str(err.value)
        assert '\n' not in message and message.startswith(f'{bad.url}: cannot download')
        assert f'put it at {weights.location(w)}' in message and folder_listing(w) == []


def test_cli_downloads_by_name_and_goes_on_after_a_failure(server, monkeypatch, capsys):
    routes, base = server
    body = real_format_bytes(2)
    musiq = served(routes, base, REGISTRY['musiq'], body, sha256=hashlib.sha256(body).hexdigest())
    dists = served(routes, base, REGISTRY['dists'], body)  # not DISTS's real bytes: its hash does not match
    vgg16 = dataclasses.replace(REGISTRY['vgg16'], url=f'{base}/not-served.pth')
    monkeypatch.setattr(weights, 'REGISTRY', tuple({'musiq': musiq, 'dists': dists, 'vgg16': vgg16}.get(w.name, w)
                                                   for w in weights.REGISTRY))
    assert nriqa_sr.main(['weights', '--download', 'musiq']) == 0
    assert f'fetched and checked: {weights.location(musiq)}' in capsys.readouterr().out
    weights.location(musiq).unlink()
    assert nriqa_sr.main(['weights', '--download', 'dists', 'musiq', 'vgg16']) == 2
    out, err = capsys.readouterr()
    assert f'fetched and checked: {weights.location(musiq)}' in out and weights.missing_weights('musiq') == []
    errors = [line for line in err.splitlines() if line.startswith('error: ')]  # progress bars go to stderr too
    assert errors[0].startswith(f'error: {dists.url}: hash mismatch')
    assert errors[1].startswith(f'error: {vgg16.url}: cannot download (Not Found)')
    assert errors[2] == 'error: weights --download: 2 download(s) failed (dists, vgg16), see above'
    assert len(errors) == 3 and not weights.location(dists).exists()
    assert nriqa_sr.main(['weights', '--download', 'nope']) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: weights --download: unknown NAME 'nope'")


# ----------------------------------------------------------------------------- Hugging Face repositories
def fake_snapshot_download(contents, corrupt=None):
    """huggingface_hub.snapshot_download writing `contents` as the Hub would (optionally one blob changed)."""
    def download(repo_id, *, allow_patterns=None, cache_dir=None, **kwargs):
        assert allow_patterns == ['config.json', 'model.safetensors']  # only what timm reads is fetched
        repo = write_hf_snapshot(cache_dir, repo_id, contents)
        if corrupt:
            (repo / 'snapshots').glob('*/' + corrupt).__next__().resolve().write_bytes(b'changed')
        return str(repo)
    return download


def test_hugging_face_repository_is_fetched_and_every_blob_checked(tmp_path, monkeypatch):
    contents = {'config.json': b'{"architecture": "resnet50"}', 'model.safetensors': b'weights' * 100}
    w = REGISTRY['resnet50']
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_snapshot_download(contents, 'model.safetensors'))
    with pytest.raises(ValueError, match='model.safetensors: hash mismatch') as err:
        weights.download([w], progress=False)
    assert '\n' not in str(err.value) and not weights.is_present(w)
    assert not list((weights.location(w) / 'blobs').glob(hashlib.sha256(contents['model.safetensors']).hexdigest()))
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_snapshot_download(contents))
    assert weights.download([w], progress=False) == [weights.location(w)]
    assert weights.is_present(w) and weights.size_on_disk(w) == sum(map(len, contents.values()))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(ValueError, match='HF_HUB_OFFLINE=1 forbids the download'):
        weights.fetch_repository(REGISTRY['inception_resnet_v2'], progress=False)


# ----------------------------------------------------------------------------- bounded downloads
@pytest.fixture
def hostile_server():
    """A 127.0.0.1 server of bad transfers: /trickle sends a byte every 0.05 s, /silent one byte then nothing,
    /endless an unending body without Content-Length, /huge a Content-Length of 1 TB, /loop redirects
    to itself. `stop` ends them all."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.0'

        def do_GET(self):
            if self.path == '/loop':
                self.send_response(302)
                self.send_header('Location', '/loop')
                self.end_headers()
                return
            self.send_response(200)
            if self.path in ('/trickle', '/silent'):
                self.send_header('Content-Length', '100000')
            elif self.path == '/huge':
                self.send_header('Content-Length', str(10**12))
            self.end_headers()
            try:
                while not stop.is_set():
                    if self.path == '/trickle':
                        self.wfile.write(b'x')
                        self.wfile.flush()
                        stop.wait(0.05)
                    elif self.path == '/silent':
                        self.wfile.write(b'x')
                        self.wfile.flush()
                        stop.wait(30)
                    else:
                        self.wfile.write(b'y' * 65536)
            except OSError:  # the client gave up: what is tested
                pass

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize('path, says', [('/trickle', 'stalled, '), ('/silent', 'timed out'),
                                        ('/endless', 'more than the 300000 bytes a weight file may have'),
                                        ('/huge', 'announces 1000000000000 bytes, over the 300000'),
                                        ('/loop', 'cannot download (The HTTP server returned a redirect error that '
                                                  'would lead to an infinite loop. The last 30x error')])
def test_a_hostile_transfer_ends_in_bounded_time_and_leaves_nothing(hostile_server, monkeypatch, path, says):
    """Stall (a trickle below STALL_BYTES per STALL_S, or nothing for STALL_S), size cap (the Content-Length,
    else MAX_BYTES) and redirect loops: one line, no temp file, well before the (here 20 s) total timeout."""
    monkeypatch.setattr(weights, 'STALL_S', 0.5)
    monkeypatch.setattr(weights, 'STALL_BYTES', 1000)
    monkeypatch.setattr(weights, 'MAX_BYTES', 300_000)
    monkeypatch.setattr(weights, 'TOTAL_S', 20)
    w = dataclasses.replace(REGISTRY['musiq'], url=hostile_server + path)
    with pytest.raises(ValueError) as err:
        weights.fetch_file(w, progress=False)
    message = str(err.value)
    assert '\n' not in message and message.startswith(w.url) and says in message, message
    assert folder_listing(w) == []


def test_total_timeout_and_a_signal_mid_transfer_leave_no_temp_file(hostile_server, monkeypatch):
    """A trickle fast enough not to stall still ends at TOTAL_S; SIGTERM mid-transfer (stops.interruptible, as
    the CLI runs) and Ctrl-C remove the temp file too."""
    monkeypatch.setattr(weights, 'STALL_S', 30)
    monkeypatch.setattr(weights, 'STALL_BYTES', 1)
    monkeypatch.setattr(weights, 'TOTAL_S', 0.6)
    w = dataclasses.replace(REGISTRY['musiq'], url=hostile_server + '/trickle')
    with pytest.raises(ValueError, match=r'not done after 0.6 s'):
        weights.fetch_file(w, progress=False)
    assert folder_listing(w) == []
    monkeypatch.setattr(weights, 'TOTAL_S', 30)
    import os
    import signal
    for signum, raised in ((signal.SIGTERM, stops.Interrupted), (signal.SIGINT, KeyboardInterrupt)):
        def kill_when_writing():
            while not any(name.endswith('.tmp') for name in folder_listing(w)):
                threading.Event().wait(0.01)
            os.kill(os.getpid(), signum)
        threading.Thread(target=kill_when_writing, daemon=True).start()
        with stops.interruptible(), pytest.raises(raised):
            weights.fetch_file(w, progress=False)
        assert folder_listing(w) == []
