"""Weights by name: ``pretrained='hf-hub:<org>/<name>[@revision]'`` through ``huggingface_hub``.

The file is downloaded once into the normal Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``) and read from
there afterwards, also offline (``HF_HUB_OFFLINE=1``). The token is huggingface_hub's own: ``HF_TOKEN`` or a
``hf auth login``. For a known preset the repository's own weights file is tried first, then timm's usual
names (``model.safetensors``, then ``pytorch_model.bin``). huggingface_hub's errors become one sentence that
says what to do.
"""
import re
from typing import List, Optional, Tuple

from mmengine.logging import print_log

from .presets import PRETRAINED, preset_for_hub_id

HUB_PREFIXES = ('hf-hub:', 'hf_hub:')
WEIGHTS_FILES = ('model.safetensors', 'pytorch_model.bin')
REPO_ID = re.compile(r'^[\w.-]+/[\w.-]+$')


class HubWeightsError(OSError):
    """Weights named ``hf-hub:...`` could not be found, downloaded or read from the cache."""


def is_hub_name(checkpoint: str) -> bool:
    """Whether ``checkpoint`` names hub weights (``hf-hub:org/name``) rather than a local file."""
    return isinstance(checkpoint, str) and checkpoint.startswith(HUB_PREFIXES)


def parse_hub_name(checkpoint: str) -> Tuple[str, Optional[str]]:
    """``'hf-hub:org/name@rev'`` -> ``('org/name', 'rev')`` (revision None when absent)."""
    if not is_hub_name(checkpoint):
        raise ValueError(f'{checkpoint!r} is not a hub name; expected hf-hub:<org>/<name>[@revision]')
    repo_id, _, revision = checkpoint.split(':', 1)[1].partition('@')
    if not REPO_ID.match(repo_id):
        raise ValueError(f'{checkpoint!r}: the repository must be written <org>/<name>, e.g. hf-hub:MahmoodLab/UNI2-h')
    return repo_id, revision or None


def candidate_files(repo_id: str) -> List[str]:
    """Weights files to try in ``repo_id``: the known file of its preset first, then timm's usual names."""
    preset = preset_for_hub_id(repo_id)
    known = [PRETRAINED[preset].weights_file] if preset else []
    return list(dict.fromkeys(known + list(WEIGHTS_FILES)))


def download_weights(checkpoint: str) -> str:
    """Local path of the weights named ``checkpoint`` (``hf-hub:org/name[@revision]``), from cache or hub."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, revision = parse_hub_name(checkpoint)
    files = candidate_files(repo_id)
    not_cached, not_in_repo = [], []
    for filename in files:
        try:
            path = hf_hub_download(repo_id, filename, revision=revision)
        except LocalEntryNotFoundError:
            not_cached.append(filename)
        except EntryNotFoundError:
            not_in_repo.append(filename)
        except GatedRepoError:
            raise HubWeightsError(
                f'{checkpoint}: the repository is gated; request access at https://huggingface.co/{repo_id} and '
                'set HF_TOKEN to a token of an account that was granted access (or run `hf auth login`)') from None
        except RepositoryNotFoundError:
            raise HubWeightsError(
                f'{checkpoint}: no such repository on the Hugging Face hub (or it is private and HF_TOKEN does not '
                'grant access); check the name against the model card') from None
        except RevisionNotFoundError:
            raise HubWeightsError(f'{checkpoint}: the repository has no revision {revision!r}; '
                                  'check the name after "@"') from None
        else:
            print_log(f'{checkpoint}: using {path}', logger='current')
            return path
    if not_in_repo:
        raise HubWeightsError(f'{checkpoint}: the repository holds none of the weights files {files}; '
                              'download the weights yourself and pass the local path')
    mode = 'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'the hub could not be reached'
    raise HubWeightsError(
        f'{checkpoint}: none of {files} is in the Hugging Face cache {constants.HF_HUB_CACHE} and {mode}; run once '
        f'with network access (or `hf download {repo_id} {files[0]}`) so that the file is cached')
