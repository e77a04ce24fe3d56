"""scripts/fetch_pretrained_teachers.py: the mdistiller archive, resumed downloads, unsafe members,
the per-file source and --evaluate, against a local HTTP server on 127.0.0.1."""
import hashlib
import http.server
import importlib.util
import io
import os
import re
import socket
import tarfile
import threading

import numpy as np
import pytest
import torch

from fake_data import write_fake_cifar100

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMBER = 'cifar_teachers/{}_vanilla/ckpt_epoch_240.pth'
MAX_REQUESTS = 60      # the server answers 503 after this many: no test can loop on it
SERVER_LIFETIME_S = 180


def load_fetch():
    spec = importlib.util.spec_from_file_location('fetch_teachers',
                                                  os.path.join(REPO, 'scripts', 'fetch_pretrained_teachers.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch = load_fetch()


def checkpoint_bytes(name, seed):
    from models import build_model
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save({'model': build_model(name, 100, dataset='cifar100').state_dict(), 'epoch': 240}, buf)
    return buf.getvalue()


def make_tar(entries):
    """entries: (TarInfo, bytes or None) in order -> the archive's bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def regular(name, data):
    return tarfile.TarInfo(name), data


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files):
        super().__init__(('127.0.0.1', 0), _Handler)
        self.files = files          # URL path -> bytes
        self.requests = []          # (path, Range header) in order
        self.ranges = True          # honour Range requests
        self.cut_once = set()       # paths whose next answer stops half-way and closes


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 20

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get('Range')))
        if len(server.requests) > MAX_REQUESTS:
            self.send_error(503)
            return
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, wanted = 0, self.headers.get('Range')
        if wanted and server.ranges:
            start = int(re.match(r'bytes=(\d+)-$', wanted).group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header('Content-Range', 'bytes {}-{}/{}'.format(start, len(body) - 1, len(body)))
        else:
            self.send_response(200)
        self.send_header('Content-Length', str(len(body) - start))
        self.end_headers()
        rest = body[start:]
        if self.path in server.cut_once:
            server.cut_once.discard(self.path)
            rest = rest[:len(rest) // 2]  # then the connection closes (HTTP/1.0)
        self.wfile.write(rest)


@pytest.fixture()
def server():
    srv = _Server({})
    thread = threading.Thread(target=srv.serve_forever, kwargs={'poll_interval': 0.1}, daemon=True)
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME_S, srv.shutdown)  # stops by itself whatever happens
    watchdog.daemon = True
    watchdog.start()
    srv.url = 'http://127.0.0.1:{}'.format(srv.server_address[1])
    yield srv
    watchdog.cancel()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope='module')
def good():
    """A valid resnet56 checkpoint (random weights): right for resnet56 only."""
    return checkpoint_bytes('resnet56', 0)


def run_fetch(args, save_root, env=None):
    lines = []
    rc = fetch.main(list(args) + ['--save_root', str(save_root)], env=dict(env or {}), log=lines.append)
    return rc, '\n'.join(lines)


def test_archive_interrupted_mid_file_is_resumed_and_extracts_only_the_requested(tmp_path, server, good):
    tar = make_tar([regular(MEMBER.format('resnet56'), good), regular(MEMBER.format('resnet110'), good),
                    regular(MEMBER.format('vgg13'), good)])
    server.files['/rel/cifar_teachers.tar'] = tar
    server.cut_once.add('/rel/cifar_teachers.tar')
    sums = tmp_path / 'sha256.txt'
    sums.write_text('{}  cifar_teachers.tar\n{}  {}\n'.format(
        hashlib.sha256(tar).hexdigest(), hashlib.sha256(good).hexdigest(), MEMBER.format('resnet56')))
    env = {'TEACHERS_URL': server.url + '/rel/cifar_teachers.tar', 'TEACHERS_SHA256': str(sums)}
    rc, out = run_fetch(['resnet56', 'resnet110'], tmp_path / 'save', env)

    assert rc == 1, out  # resnet110's member holds resnet56's weights
    # the first answer stopped half-way; the second asked for the rest, and got it
    assert server.requests == [('/rel/cifar_teachers.tar', None),
                               ('/rel/cifar_teachers.tar', 'bytes={}-'.format(len(tar) // 2))]
    assert '[retry]' in out and '[resume]' in out
    archive = tmp_path / 'save' / 'downloads' / 'cifar_teachers.tar'
    assert archive.read_bytes() == tar and not (tmp_path / 'save' / 'downloads' / 'cifar_teachers.tar.part').exists()
    models = tmp_path / 'save' / 'models'
    assert (models / 'resnet56_vanilla' / 'ckpt_epoch_240.pth').read_bytes() == good
    assert not (models / 'resnet110_vanilla').exists()
    assert not (models / 'vgg13_vanilla').exists()  # in the archive, not requested
    assert 'weights do not fit resnet110' in out and 'could not fetch: resnet110' in out
    assert sorted(p.name for p in models.iterdir()) == ['resnet56_vanilla']

    # the archive is downloaded once: another teacher comes out of the copy in save/downloads/
    rc, out = run_fetch(['vgg13', 'resnet56'], tmp_path / 'save', {'TEACHERS_URL': env['TEACHERS_URL']})
    assert len(server.requests) == 2
    assert rc == 1 and '[skip]' in out and 'weights do not fit vgg13' in out


def test_archive_left_half_downloaded_by_an_earlier_run(tmp_path, server, good):
    tar = make_tar([regular(MEMBER.format('resnet56'), good)])
    server.files['/cifar_teachers.tar'] = tar
    downloads = tmp_path / 'save' / 'downloads'
    downloads.mkdir(parents=True)
    (downloads / 'cifar_teachers.tar.part').write_bytes(tar[:3000])
    rc, out = run_fetch(['resnet56'], tmp_path / 'save', {'TEACHERS_URL': server.url + '/cifar_teachers.tar'})
    assert rc == 0, out
    assert server.requests == [('/cifar_teachers.tar', 'bytes=3000-')]
    assert (downloads / 'cifar_teachers.tar').read_bytes() == tar

    # a server without byte ranges: the download starts again from zero
    server.ranges = False
    (downloads / 'cifar_teachers.tar').rename(downloads / 'old.tar')
    (downloads / 'cifar_teachers.tar.part').write_bytes(b'x' * 100)
    (tmp_path / 'save' / 'models' / 'resnet56_vanilla' / 'ckpt_epoch_240.pth').unlink()
    rc, out = run_fetch(['resnet56'], tmp_path / 'save', {'TEACHERS_URL': server.url + '/cifar_teachers.tar'})
    assert rc == 0 and '[restart]' in out, out
    assert (downloads / 'cifar_teachers.tar').read_bytes() == tar


def test_unsafe_members_are_refused(tmp_path, server, good):
    link = tarfile.TarInfo(MEMBER.format('vgg13'))
    link.type, link.linkname = tarfile.SYMTYPE, '../../../../../../etc/passwd'
    hard = tarfile.TarInfo(MEMBER.format('resnet110'))
    hard.type, hard.linkname = tarfile.LNKTYPE, MEMBER.format('resnet56')
    device = tarfile.TarInfo(MEMBER.format('ResNet50'))
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    tar = make_tar([regular(MEMBER.format('resnet56'), good),
                    regular('/' + MEMBER.format('wrn_40_2'), good),                          # absolute
                    regular('cifar_teachers/x/../' + MEMBER.format('resnet32x4')[15:], good),  # '..'
                    regular('../../escape.pth', good),                                      # never asked for
                    (link, None), (hard, None), (device, None)])
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:  # the archive holds the names as written
        assert '/' + MEMBER.format('wrn_40_2') in t.getnames()
    server.files['/cifar_teachers.tar'] = tar
    save = tmp_path / 'inside' / 'save'
    rc, out = run_fetch([], save, {'TEACHERS_URL': server.url + '/cifar_teachers.tar'})
    assert rc == 1, out
    assert '[ ok ]' in out and (save / 'models' / 'resnet56_vanilla' / 'ckpt_epoch_240.pth').read_bytes() == good
    refused = dict(re.findall(r'\[FAIL\] (\S+): refused the archive member .*?: it is (.*)', out))
    assert sorted(refused) == ['ResNet50', 'resnet110', 'resnet32x4', 'vgg13', 'wrn_40_2'], out
    assert refused['wrn_40_2'] == 'an absolute path' and refused['resnet32x4'] == "a path with '..'"
    assert refused['vgg13'].startswith('a link') and refused['resnet110'].startswith('a link')
    assert refused['ResNet50'] == 'a device or pipe'
    # nothing was written anywhere but the one good teacher and the archive
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*') if not p.is_dir())
    assert written == ['inside/save/downloads/cifar_teachers.tar',
                       'inside/save/models/resnet56_vanilla/ckpt_epoch_240.pth']

    # the same verdicts from the check alone; tarfile's own data filter (where it exists) refuses
    # members that leave the folder and devices, but strips a leading '/' and lets a hard link or a
    # '..' that stays inside pass, which is why the script checks for itself too
    dest = str(tmp_path / 'dest')
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for member in t.getmembers():
            assert (fetch.unsafe_member(member, dest) is None) == (member.name == MEMBER.format('resnet56'))
            if hasattr(tarfile, 'data_filter') and (member.type in (tarfile.SYMTYPE, tarfile.CHRTYPE) or
                                                    member.name.startswith('..')):
                with pytest.raises(tarfile.FilterError):
                    tarfile.data_filter(member, dest)


def test_per_file_source_and_failure_messages(tmp_path, server, good):
    server.files['/repo/' + MEMBER.format('resnet56')[15:]] = good
    rc, out = run_fetch(['--source', 'repdistiller', 'resnet56'], tmp_path / 'save', {'TEACHERS_URL': server.url +
                                                                                      '/repo'})
    assert rc == 0, out
    assert server.requests == [('/repo/resnet56_vanilla/ckpt_epoch_240.pth', None)]
    assert (tmp_path / 'save' / 'models' / 'resnet56_vanilla' / 'ckpt_epoch_240.pth').read_bytes() == good

    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        closed = 'http://127.0.0.1:{}'.format(s.getsockname()[1])
    rc, out = run_fetch(['resnet110'], tmp_path / 'save', {'TEACHERS_URL': closed + '/cifar_teachers.tar'})
    assert rc == 1 and 'cannot connect to {}/cifar_teachers.tar'.format(closed) in out
    assert 'The mdistiller source failed; try --source repdistiller' in out
    rc, out = run_fetch(['--source', 'repdistiller', 'resnet110'], tmp_path / 'save', {'TEACHERS_URL': closed})
    assert rc == 1 and 'The repdistiller source failed; try --source mdistiller' in out
    # the archive URL answers 404: the message names the URL and the next source
    rc, out = run_fetch(['resnet110'], tmp_path / 'save', {'TEACHERS_URL': server.url + '/gone.tar'})
    assert rc == 1 and 'HTTP 404' in out and server.url + '/gone.tar' in out and '--source repdistiller' in out
    assert fetch.SOURCES['mdistiller'] == ('https://github.com/megvii-research/mdistiller/releases/download/'
                                           'checkpoints/cifar_teachers.tar')


def test_evaluate_reports_accuracy_beside_the_paper(tmp_path, good):
    save = tmp_path / 'save'
    target = save / 'models' / 'resnet56_vanilla' / 'ckpt_epoch_240.pth'
    target.parent.mkdir(parents=True)
    target.write_bytes(good)
    rc, out = run_fetch(['resnet56', '--evaluate', '--data_folder', str(tmp_path / 'nodata')], save)
    assert rc == 0 and '--evaluate skipped' in out

    data, labels = write_fake_cifar100(tmp_path / 'data', n_train=10, n_test=64)['test']
    rc, out = run_fetch(['resnet56', '--evaluate', '--data_folder', str(tmp_path / 'data')], save)
    assert rc == 0, out
    row = re.search(r'^resnet56\s+(\S+)\s+(\S+)\s+(\S+)(.*)$', out, re.M)
    # ground truth: the network on the images normalised by hand
    from models import build_model
    net = build_model('resnet56', 100, dataset='cifar100').eval()
    net.load_state_dict(torch.load(io.BytesIO(good), weights_only=True)['model'])
    x = torch.tensor(data.reshape(-1, 3, 32, 32), dtype=torch.float32) / 255.0
    x = (x - torch.tensor([0.5071, 0.4867, 0.4408]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2675, 0.2565, 0.2761]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = 100.0 * float((net(x).argmax(1).numpy() == np.array(labels)).mean())
    assert float(row.group(1)) == pytest.approx(expected, abs=0.006)
    assert float(row.group(2)) == 72.34  # RepDistiller's README
    assert float(row.group(3)) == pytest.approx(expected - 72.34, abs=0.011)
    assert 'a bad file?' in row.group(4)  # random weights are far from the paper


def test_wrapper_usage_errors(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'fetch_pretrained_teachers.sh'), 'resnet57'],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and "unknown teacher 'resnet57'" in proc.stderr
