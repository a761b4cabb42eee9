"""Mask loading for SegPath: both released encodings to {0, 1}, with checks that name the file."""
import mmcv
import mmengine.fileio as fileio
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import TRANSFORMS

from .segpath import binarize_segpath_mask


@TRANSFORMS.register_module()
class LoadSegPathAnnotations(LoadAnnotations):
    """Load a SegPath mask as ``gt_seg_map`` with values {0, 1}.

    SegPath masks come as {0, 1} or {0, 255}; mmseg's ``LoadAnnotations`` would pass 255 through
    as the ignore index and silently drop every foreground pixel of such tiles. An empty, truncated or
    undecodable file, other values, a multi-channel mask, or a mask whose size differs from the image
    loaded before it (``ori_shape`` from ``LoadImageFromFile``) raise an error naming the mask file.

    Images without a mask (no ``seg_map_path``, e.g. an array or path given to mmseg's
    ``inference_model`` / ``MMSegInferencer``) pass through unchanged: those APIs strip only a
    transform named ``LoadAnnotations`` from the test pipeline, so this one must tolerate inference.

    Args:
        backend_args: file backend arguments, as in mmseg's ``LoadAnnotations``.
        imdecode_backend: 'pillow' (mmseg's default) or 'cv2'.
    """

    def __init__(self, backend_args=None, imdecode_backend: str = 'pillow') -> None:
        super().__init__(backend_args=backend_args, imdecode_backend=imdecode_backend)

    def transform(self, results: dict) -> dict:
        if results.get('seg_map_path') is None:  # inference: nothing to load
            return results
        return super().transform(results)

    def _load_seg_map(self, results: dict) -> None:
        path = results['seg_map_path']
        img_bytes = fileio.get(path, backend_args=self.backend_args)
        hint = 'empty, truncated or not an image? tools/prepare_segpath.py --strict finds such files'
        try:
            mask = mmcv.imfrombytes(img_bytes, flag='unchanged', backend=self.imdecode_backend)
        except Exception as err:  # Pillow / OpenCV name a BytesIO or nothing; any failure means a bad file
            raise ValueError(f'{path}: cannot decode the mask with {self.imdecode_backend} '
                             f'({type(err).__name__}: {str(err).strip()}); {hint}') from err
        if mask is None:  # OpenCV returns None instead of raising
            raise ValueError(f'{path}: cannot decode the mask with cv2; {hint}')
        mask = binarize_segpath_mask(mask, path)
        image_shape = results.get('ori_shape')
        if image_shape is not None and tuple(image_shape[:2]) != mask.shape:
            raise ValueError(f'{path}: mask size {mask.shape} differs from image size {tuple(image_shape[:2])} '
                             f'of {results.get("img_path")}')
        results['gt_seg_map'] = mask
        results['seg_fields'].append('gt_seg_map')
