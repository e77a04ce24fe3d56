#!/usr/bin/env python
"""Fetch the published CIFAR-100 teachers (trained by the RepDistiller authors, used by the SemCKD
paper) into save/models/{name}_vanilla/ckpt_epoch_240.pth.

    scripts/fetch_pretrained_teachers.sh                          # all six teachers
    scripts/fetch_pretrained_teachers.sh resnet32x4 vgg13         # or only some
    scripts/fetch_pretrained_teachers.sh --evaluate               # and report their CIFAR-100 accuracy
    scripts/fetch_pretrained_teachers.sh --source repdistiller    # the old per-file server

Sources:
  mdistiller    (default) one archive from a GitHub release of mdistiller, cifar_teachers.tar, whose
                members are cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth. It is downloaded once into
                save/downloads/ (resuming an interrupted download) and only the requested teachers are
                extracted from it. Members that are links, devices, absolute paths or paths with '..'
                are refused; the file we write is always save/models/{name}_vanilla/ckpt_epoch_240.pth.
  repdistiller  the RepDistiller authors' server, one file per teacher (reported dead for years).

Environment:
  TEACHERS_SOURCE  mdistiller | repdistiller (what --source sets)
  TEACHERS_URL     a mirror: for mdistiller the archive's URL, for repdistiller the base URL under which
                   {name}_vanilla/ckpt_epoch_240.pth lie. Without a source, a TEACHERS_URL that does not
                   end in .tar (or .tar.gz, .tgz) means the repdistiller layout, as it did before.
  TEACHERS_SHA256  optional file of "sha256  NAME" lines (the format sha256sum prints); NAME may be the
                   teacher's name, {name}_vanilla/ckpt_epoch_240.pth with any folder in front, or
                   cifar_teachers.tar for the archive. No checksums are published for these files, so
                   by default a file is checked only by loading it into our model of that name.
  TEACHERS_TRUST_PICKLE=1  load with torch.load(weights_only=False); by default files are loaded with
                   weights_only=True, so a download cannot run code.

Every file is verified before it is put where the training scripts look for teachers: its sha256 when
one is listed, then a strict load (weights_only=True) of its 'model' state_dict into models.model_dict's
network of that name. Exit status: 0 when every requested teacher is present and valid, 1 when any
failed, 2 on bad usage.
"""
import argparse
import hashlib
import http.client
import os
import posixpath
import shutil
import socket
import sys
import tarfile
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TEACHERS = ['wrn_40_2', 'resnet56', 'resnet110', 'resnet32x4', 'vgg13', 'ResNet50']
# CIFAR-100 test top-1 of each teacher, the "Teacher" row of RepDistiller's README
PAPER_ACC = {'wrn_40_2': 75.61, 'resnet56': 72.34, 'resnet110': 74.31, 'resnet32x4': 79.42, 'vgg13': 74.64,
             'ResNet50': 79.34}
# an accuracy further than this from the paper's flags the file
ACC_TOLERANCE = 1.0
SOURCES = {
    'mdistiller': 'https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar',
    'repdistiller': 'http://shape2prog.csail.mit.edu/repo',
}
ARCHIVE_EXTENSIONS = ('.tar', '.tar.gz', '.tgz')
CHECKPOINT = '{}_vanilla/ckpt_epoch_240.pth'
ARCHIVE_MEMBER = 'cifar_teachers/' + CHECKPOINT
NEXT_SOURCE = {
    'mdistiller': '--source repdistiller (the RepDistiller server)',
    'repdistiller': '--source mdistiller (the default: the mdistiller release archive)',
}


class Failure(Exception):
    """One line saying why a download, an extraction or a check failed."""


# ----------------------------------------------------------------------------------------------- download
def _content_range(value):
    """'bytes 100-199/1000' -> (100, 1000); the total may be None ('*')."""
    try:
        unit, spec = value.split(' ', 1)
        span, total = spec.split('/')
        return int(span.split('-')[0]), (None if total.strip() == '*' else int(total))
    except ValueError:
        return None, None


def download(url, part, attempts=4, timeout=30, chunk=1 << 20, log=print):
    """Download ``url`` into the file ``part``; the caller renames it once it is checked.

    What ``part`` already holds (an earlier, interrupted download) is resumed with an HTTP Range
    request; a server that ignores ranges (200 instead of 206) or refuses them (416) is read again
    from zero. A connection that drops mid-file is resumed up to ``attempts`` times. Raises ``Failure``.
    """
    reason = None
    for _ in range(attempts):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={'User-Agent': 'fetch_pretrained_teachers'})
        if have:
            request.add_header('Range', 'bytes={}-'.format(have))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status == 206:
                    start, total = _content_range(response.headers.get('Content-Range', ''))
                    if start != have:
                        raise Failure('the server resumed {} at byte {} instead of {}'.format(url, start, have))
                    mode = 'ab'
                    log('[resume] {} from byte {}'.format(url, have))
                else:
                    if have:
                        log('[restart] the server does not resume downloads; reading {} from zero'.format(url))
                    have, mode = 0, 'wb'
                    length = response.headers.get('Content-Length')
                    total = int(length) if length and length.isdigit() else None
                with open(part, mode) as f:
                    shutil.copyfileobj(response, f, chunk)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # a range past the end: the .part is not what we think
                os.remove(part)
                reason = 'HTTP 416 for a resumed range'
                continue
            raise Failure('the server answered HTTP {} ({}) for {} (moved or missing?)'.format(
                err.code, err.reason, url))
        except urllib.error.URLError as err:
            why = err.reason
            if isinstance(why, socket.gaierror):
                raise Failure('cannot resolve the host of {} (offline? no DNS?)'.format(url))
            if isinstance(why, (socket.timeout, TimeoutError)):
                raise Failure('timed out reaching {} (offline, or the server is down)'.format(url))
            raise Failure('cannot connect to {} (offline, or the server is down: {})'.format(url, why))
        except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError) as err:
            reason = '{} after {} bytes'.format(type(err).__name__, os.path.getsize(part) if os.path.exists(part)
                                                 else 0)
            log('[retry] the download of {} was interrupted ({}); resuming'.format(url, reason))
            continue
        size = os.path.getsize(part)
        if total is not None and size != total:
            reason = 'got {} of {} bytes'.format(size, total)
            log('[retry] the download of {} stopped early ({}); resuming'.format(url, reason))
            continue
        return
    raise Failure('the download of {} was interrupted {} times (last: {}); run again to resume it'.format(
        url, attempts, reason))


# ----------------------------------------------------------------------------------------------- checks
def read_checksums(path):
    """A sha256sum-style file -> {name: sha256}."""
    sums = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                sums[parts[1].lstrip('*')] = parts[0].lower()
    return sums


def expected_sha(sums, *names):
    """The listed sha256 of a file listed as one of ``names``, or as any path ending in one."""
    for listed, sha in sums.items():
        if any(listed == n or listed.endswith('/' + n) for n in names):
            return sha
    return None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def verify(name, path, sha=None, trust_pickle=False):
    """Raise ``Failure`` unless ``path`` is a checkpoint of teacher ``name``.

    Its sha256 when one is listed, then ``{'model': state_dict}`` loading with strict=True into our
    model of that name (``torch.load(weights_only=True)`` unless ``trust_pickle``).
    """
    import torch
    from models import build_model

    if sha:
        digest = sha256(path)
        if digest != sha:
            raise Failure('sha256 {} does not match the listed {}'.format(digest, sha))
    with open(path, 'rb') as f:
        head = f.read(4)
    # torch.save writes a zip archive; torch < 1.6 wrote a bare pickle (protocol 2)
    if not (head.startswith(b'PK') or head.startswith(b'\x80')):
        raise Failure('not a torch checkpoint (it starts with {!r}; an HTML error page?)'.format(head))
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except Exception as err:
        hint = '' if trust_pickle else '; if you trust its source, TEACHERS_TRUST_PICKLE=1 loads it with ' \
                                       'weights_only=False'
        raise Failure('not a readable torch checkpoint (torch.load failed: {}){}'.format(type(err).__name__, hint))
    state = ckpt.get('model') if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise Failure("not a {'model': state_dict} checkpoint")
    net = build_model(name, 100, dataset='cifar100')
    want = net.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and tuple(getattr(state[k], 'shape', ())) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        raise Failure('weights do not fit {}: {} missing, {} unexpected, {} of a wrong shape (e.g. {})'.format(
            name, len(missing), len(unexpected), len(wrong), (missing + unexpected + wrong)[0]))
    try:
        net.load_state_dict(state, strict=True)
    except Exception as err:
        raise Failure('weights do not load into {} ({})'.format(name, str(err).splitlines()[0][:200]))
    return net


# ----------------------------------------------------------------------------------------------- archive
def unsafe_member(member, dest):
    """Why ``member`` may not be extracted into ``dest``, or None when it is a plain file inside it."""
    name = member.name
    if name.startswith('/') or name.startswith('\\') or os.path.isabs(name) or (len(name) > 1 and name[1] == ':'):
        return 'an absolute path'
    if '..' in name.replace('\\', '/').split('/'):
        return "a path with '..'"
    if member.issym() or member.islnk():
        return 'a link (to {!r})'.format(member.linkname)
    if member.ischr() or member.isblk() or member.isfifo():
        return 'a device or pipe'
    if not member.isreg():
        return 'not a regular file'
    data_filter = getattr(tarfile, 'data_filter', None)  # Python >= 3.12, and 3.8.17+ / 3.11.4+
    if data_filter is not None:
        try:
            data_filter(member, dest)
        except tarfile.FilterError as err:
            return 'refused by tarfile\'s data filter ({})'.format(err)
    return None


def find_members(tar, names):
    """{teacher: TarInfo} of the archive's members for ``names``, matched on their normalised path.

    The last of several members with one path wins, as when tar extracts them in order.
    """
    wanted = {ARCHIVE_MEMBER.format(n): n for n in names}
    found = {}
    for member in tar.getmembers():
        key = posixpath.normpath(member.name.replace('\\', '/').lstrip('/'))
        if key in wanted:
            found[wanted[key]] = member
    return found


def fetch_from_archive(names, url, sums, trust, downloads, models_dir, log):
    """Download the archive once and extract ``names``; returns {name: reason} of those that failed."""
    archive = os.path.join(downloads, os.path.basename(url.split('?')[0]) or 'cifar_teachers.tar')
    os.makedirs(downloads, exist_ok=True)
    if os.path.isfile(archive):
        log('[have] {}'.format(os.path.relpath(archive)))
    else:
        log('[get ] {}'.format(url))
        try:
            download(url, archive + '.part', log=log)
        except Failure as err:
            return {n: str(err) for n in names}, True
        os.replace(archive + '.part', archive)
        sha = expected_sha(sums, os.path.basename(archive))
        if sha:
            digest = sha256(archive)
            if digest != sha:
                os.remove(archive)
                why = 'the archive {}: sha256 {} does not match the listed {}; deleted it'.format(url, digest, sha)
                return {n: why for n in names}, True
    try:
        tar = tarfile.open(archive, 'r:*')
    except (tarfile.TarError, EOFError, OSError) as err:
        os.remove(archive)
        why = '{} is not a readable tar archive ({}); deleted it, run again to download it anew'.format(
            os.path.relpath(archive), err)
        return {n: why for n in names}, True
    failed = {}
    with tar:
        members = find_members(tar, names)
        for name in names:
            member = members.get(name)
            if member is None:
                failed[name] = 'the archive holds no {}'.format(ARCHIVE_MEMBER.format(name))
                continue
            folder = os.path.join(models_dir, '{}_vanilla'.format(name))
            why = unsafe_member(member, folder)
            if why:
                failed[name] = 'refused the archive member {!r}: it is {}'.format(member.name, why)
                continue
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, 'ckpt_epoch_240.pth')
            part = target + '.part'
            # we write to a path of our own, never to the member's name
            with tar.extractfile(member) as src, open(part, 'wb') as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            try:
                verify(name, part, expected_sha(sums, name, CHECKPOINT.format(name)), trust)
            except Failure as err:
                os.remove(part)
                _remove_if_empty(folder)
                failed[name] = 'the archive\'s file is not a valid {} teacher: {}'.format(name, err)
                continue
            os.replace(part, target)
            log('[ ok ] {}'.format(os.path.relpath(target)))
    return failed, False


def fetch_per_file(names, base, sums, trust, models_dir, log):
    """One download per teacher from ``base``; returns {name: reason} of those that failed."""
    failed = {}
    for name in names:
        folder = os.path.join(models_dir, '{}_vanilla'.format(name))
        target = os.path.join(folder, 'ckpt_epoch_240.pth')
        url = '{}/{}'.format(base.rstrip('/'), CHECKPOINT.format(name))
        os.makedirs(folder, exist_ok=True)
        log('[get ] {}'.format(url))
        part = target + '.part'
        try:
            download(url, part, log=log)
        except Failure as err:
            if os.path.exists(part) and os.path.getsize(part) == 0:
                os.remove(part)  # keep a partial download to resume, never an empty one
            _remove_if_empty(folder)
            failed[name] = str(err)
            continue
        try:
            verify(name, part, expected_sha(sums, name, CHECKPOINT.format(name)), trust)
        except Failure as err:
            os.remove(part)
            _remove_if_empty(folder)
            failed[name] = 'the downloaded file is not a valid {} teacher: {}; deleted it'.format(name, err)
            continue
        os.replace(part, target)
        log('[ ok ] {}'.format(os.path.relpath(target)))
    return failed


def _remove_if_empty(folder):
    try:
        os.rmdir(folder)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- evaluate
def evaluate(names, models_dir, data_folder, trust, log):
    """Print each teacher's CIFAR-100 test top-1 beside the paper's; returns {name: accuracy}."""
    import torch
    from torch.utils.data import DataLoader
    from dataset.cifar100 import CIFAR100, test_transform
    from helper.loops import validate

    if not os.path.isfile(os.path.join(data_folder, 'cifar-100-python', 'test')):
        log('[eval] CIFAR-100 is not in {} (cifar-100-python/test); --evaluate skipped. Download it with\n'
            '       python -c "import torchvision; torchvision.datasets.CIFAR100(\'{}\', download=True)"'
            .format(data_folder, data_folder))
        return {}
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    loader = DataLoader(CIFAR100(data_folder, train=False, transform=test_transform()), batch_size=256)
    settings = argparse.Namespace(amp=None, channels_last=False)
    results = {}
    log('\n{:<12} {:>10} {:>12} {:>8}'.format('teacher', 'top-1', 'paper top-1', 'diff'))
    for name in names:
        path = os.path.join(models_dir, '{}_vanilla'.format(name), 'ckpt_epoch_240.pth')
        net = verify(name, path, trust_pickle=trust).to(device)
        acc, _, _ = validate(loader, net, settings, device)
        results[name] = acc
        diff = acc - PAPER_ACC[name]
        flag = '   <- off by more than {:g} points: a bad file? delete it and fetch again'.format(
            ACC_TOLERANCE) if abs(diff) > ACC_TOLERANCE else ''
        log('{:<12} {:>10.2f} {:>12.2f} {:>+8.2f}{}'.format(name, acc, PAPER_ACC[name], diff, flag))
    log('(paper: the teachers\' row of RepDistiller\'s README; {} test images)'.format(len(loader.dataset)))
    return results


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('names', nargs='*', metavar='NAME', help='teachers to fetch (default all: {})'.format(
        ' '.join(TEACHERS)))
    parser.add_argument('--source', choices=sorted(SOURCES), default=None,
                        help='where to download from (default mdistiller, or $TEACHERS_SOURCE)')
    parser.add_argument('--evaluate', action='store_true',
                        help="report each teacher's CIFAR-100 test accuracy beside the paper's (needs the data)")
    parser.add_argument('--data_folder', default=os.path.join(REPO, 'data'),
                        help='where CIFAR-100 lives for --evaluate (default: the repository\'s data/)')
    parser.add_argument('--save_root', default=os.path.join(REPO, 'save'),
                        help='teachers go to SAVE_ROOT/models/, the archive to SAVE_ROOT/downloads/')
    return parser.parse_args(argv)


def resolve_source(args, env):
    source = args.source or env.get('TEACHERS_SOURCE') or None
    url = env.get('TEACHERS_URL') or None
    if source is None:
        # a mirror given the old way (a base URL of per-file layout) keeps working
        source = 'repdistiller' if url and not url.split('?')[0].endswith(ARCHIVE_EXTENSIONS) else 'mdistiller'
    if source not in SOURCES:
        raise SystemExit(_usage_error("TEACHERS_SOURCE={} is not a source; use one of: {}".format(
            source, ', '.join(sorted(SOURCES)))))
    return source, (url or SOURCES[source]).rstrip('/')


def _usage_error(message):
    print('error: ' + message, file=sys.stderr)
    return 2


def main(argv=None, env=None, log=print):
    args = parse_args(argv)
    env = os.environ if env is None else env
    for name in args.names:
        if name not in TEACHERS:
            return _usage_error("unknown teacher '{}'; choose from: {}".format(name, ' '.join(TEACHERS)))
    names = list(dict.fromkeys(args.names)) or list(TEACHERS)
    source, url = resolve_source(args, env)
    sha_file = env.get('TEACHERS_SHA256') or None
    if sha_file and not os.path.isfile(sha_file):
        return _usage_error('TEACHERS_SHA256={} is not a readable file; unset it or point it at a sha256sum list'
                            .format(sha_file))
    sums = read_checksums(sha_file) if sha_file else {}
    trust = env.get('TEACHERS_TRUST_PICKLE') == '1'
    try:
        import torch  # noqa: F401  (the check of every file needs torch and our models)
        import models  # noqa: F401
    except ImportError as err:
        log("error: '{}' cannot import torch and the repo's models/, which the check of each file needs: {}\n"
            "       Activate the project's environment or set PYTHON=/path/to/python.".format(sys.executable, err))
        return 1

    models_dir = os.path.join(args.save_root, 'models')
    todo = []
    for name in names:
        target = os.path.join(models_dir, CHECKPOINT.format(name))
        if not os.path.isfile(target):
            todo.append(name)
            continue
        try:
            verify(name, target, expected_sha(sums, name, CHECKPOINT.format(name)), trust)
            log('[skip] {} is present and valid'.format(os.path.relpath(target)))
        except Failure as err:
            log('[redo] {} is present but invalid: {}; moving it to {}.invalid'.format(
                os.path.relpath(target), err, os.path.relpath(target)))
            os.replace(target, target + '.invalid')
            todo.append(name)

    failed, source_failed = {}, False
    if todo:
        log('==> source: {} ({})'.format(source, url))
        if source == 'mdistiller':
            failed, source_failed = fetch_from_archive(todo, url, sums, trust,
                                                       os.path.join(args.save_root, 'downloads'), models_dir, log)
        else:
            failed = fetch_per_file(todo, url, sums, trust, models_dir, log)
            source_failed = bool(failed) and all(r.startswith(('cannot ', 'timed out', 'the server answered'))
                                                 for r in failed.values())
    for name in names:
        if name in failed:
            log('[FAIL] {}: {}'.format(name, failed[name]))
    if failed:
        log('       The {} source failed; try {}, set TEACHERS_URL to a reachable mirror, or copy the file(s) '
            'to {} by hand.'.format(source, NEXT_SOURCE[source],
                                    os.path.relpath(os.path.join(models_dir, CHECKPOINT.format('NAME'))))
            if source_failed else
            '       Set TEACHERS_URL to another mirror or try {}.'.format(NEXT_SOURCE[source]))
    if args.evaluate:
        evaluate([n for n in names if n not in failed], models_dir, args.data_folder, trust, log)
    if failed:
        log('error: could not fetch: {}'.format(' '.join(n for n in names if n in failed)))
        return 1
    log('all requested teachers are in {}'.format(os.path.relpath(models_dir)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
