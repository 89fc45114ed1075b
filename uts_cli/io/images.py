"""Read H&E images: whole high-power fields (HPFs) and regions of big, pyramidal slides.

``open_image(path)`` returns an :class:`ImageReader` for TIFF/SVS files (through tifffile) and
PNG/JPEG files (through imageio). Big TIFFs are read region by region through
``tifffile``'s zarr store, so a whole-slide image is never loaded into memory at once; small
images (up to ``max_cached_pixels``) are decoded once and kept, which makes many region reads
of one HPF cheap.

Pixel-format policy: **8-bit RGB only.** Every model and stain step in ``uts`` assumes H&E
brightfield images with three 8-bit channels. Grayscale, RGBA, 16-bit or floating-point images
(and stacks or multi-channel TIFFs) are refused when the file is opened, from its header and
before any pixels are decoded, with a message that names the file and what was found and a
hint how to convert it (``vips colourspace IN OUT srgb``, or the numpy expression for the
case: drop alpha, scale 16 bits by 1/257, repeat a gray channel). We do not convert silently:
a guessed intensity scaling or alpha blend would change the stain statistics the method
depends on, so the user converts once, knowingly.

Every failure to read an image (missing, truncated or corrupt file, a codec that needs the
``imagecodecs`` package, ``zarr`` not installed) raises :class:`~uts_cli.errors.InputDataError`
with the path in the message and a hint.

Tissue detection for whole slides: :func:`tissue_mask` (Otsu on saturation of a low-resolution
copy) and :func:`tissue_fraction` (the tissue share of a full-resolution window).
"""
from __future__ import annotations

import abc
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile

from uts_cli.errors import InputDataError, ResourceError

TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".svs"})
PLAIN_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
IMAGE_SUFFIXES = TIFF_SUFFIXES | PLAIN_SUFFIXES

# Files that operating systems and viewers drop into image folders.
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "ehthumbs.db"})

# Images up to this many pixels are decoded once and kept in memory (an HPF of 7215 x 5412
# px is 39 Mpx, 117 MB as RGB); bigger ones are read chunk by chunk through zarr.
DEFAULT_MAX_CACHED_PIXELS = 64_000_000

# read() refuses images bigger than this: a whole-slide image must be read region by region.
MAX_WHOLE_READ_PIXELS = 400_000_000

# A recorded pixel size outside this range is a placeholder (e.g. 72 dpi), not a microscope's.
_PLAUSIBLE_UM = (0.01, 20.0)

# Exceptions third-party decoders raise on malformed or truncated files.
_DECODE_ERRORS = (
    tifffile.TiffFileError,
    ValueError,
    OSError,
    EOFError,
    IndexError,
    KeyError,
    RuntimeError,
    SyntaxError,
    struct.error,
    zlib.error,
)

_CONVERT_HINT = "convert it to 8-bit RGB"
_CONVERT_HOW = {
    "gray": ", e.g. `vips colourspace IN OUT.tif srgb`, or np.repeat(img[..., None], 3, axis=-1)",
    "rgba": ", e.g. in Python keep img[..., :3] (drops the alpha channel)",
    "deep": ", e.g. `vips colourspace IN OUT.tif srgb`, or (img / 257).round().astype(np.uint8)",
}


def is_junk(path: str | Path) -> bool:
    """Return True for files a dataset walk must skip (hidden files, Thumbs.db, .DS_Store).

    Args:
        path: file path (only its name is inspected).

    Returns:
        Whether the file is junk.
    """
    name = Path(path).name
    return name.startswith(".") or name.startswith("~$") or name.lower() in JUNK_NAMES


def is_image_file(path: str | Path) -> bool:
    """Return True when ``path`` has a supported image suffix and is not junk."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES and not is_junk(path)


def list_image_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """List supported image files below ``folder``, sorted, skipping junk and hidden folders.

    Args:
        folder: directory to walk.
        recursive: descend into sub-folders (hidden ones are skipped).

    Returns:
        Sorted list of image paths.
    """
    folder = Path(folder)
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                found.extend(list_image_files(entry, recursive=True))
        elif entry.is_file() and is_image_file(entry):
            found.append(entry)
    return found


class ImageReader(abc.ABC):
    """Read access to one RGB image (a field or a pyramidal slide); use as a context manager.

    Attributes:
        path: the image file.
        shape: ``(H, W, 3)`` of the full-resolution image.
        level_shapes: ``[(H, W), ...]`` per pyramid level, full resolution first.
        pixel_size_um: micrometres per pixel when the file records it, else None.
    """

    path: Path
    shape: tuple[int, int, int]
    level_shapes: list[tuple[int, int]]
    pixel_size_um: float | None

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handle (safe to call twice)."""

    def read(self) -> np.ndarray:
        """Read the whole full-resolution image.

        Returns:
            uint8 array (H, W, 3).

        Raises:
            InputDataError: the pixels cannot be decoded.
            ResourceError: the image is a whole slide too big to hold in memory.
        """
        height, width, _ = self.shape
        if height * width > MAX_WHOLE_READ_PIXELS:
            raise ResourceError(
                f"{self.path} is {height} x {width} px, too big to read at once",
                hint="read it region by region (whole-slide mode)",
            )
        with self._decoding():
            return self._read_whole()

    def read_region(self, y0: int, x0: int, h: int, w: int, level: int = 0) -> np.ndarray:
        """Read a window of one pyramid level; parts outside the image are white (255).

        Args:
            y0: top row (may be negative), in pixels of ``level``.
            x0: left column (may be negative), in pixels of ``level``.
            h: window height in pixels.
            w: window width in pixels.
            level: pyramid level (0 = full resolution; see ``level_shapes``).

        Returns:
            uint8 array (h, w, 3).

        Raises:
            InputDataError: the pixels cannot be decoded.
        """
        height, width = self.level_shapes[level]
        out = np.full((h, w, 3), 255, np.uint8)
        ya, yb = max(y0, 0), min(y0 + h, height)
        xa, xb = max(x0, 0), min(x0 + w, width)
        if ya < yb and xa < xb:
            with self._decoding():
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self._read_window(level, ya, yb, xa, xb)
        return out

    def read_lowres(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """Read a low-resolution copy for tissue detection.

        Uses the largest pyramid level whose longer side is at most ``max_side``; when no level
        is that small, the smallest level is subsampled with a stride.

        Args:
            max_side: upper bound on the longer side of the result, in pixels.

        Returns:
            ``(rgb, scale)``: uint8 array and the factor from full-resolution to its pixels
            (``lowres_coordinate = full_coordinate * scale``).

        Raises:
            InputDataError: the pixels cannot be decoded.
        """
        if max_side < 1:
            raise ValueError("max_side must be positive")
        fitting = [i for i, (h, w) in enumerate(self.level_shapes) if max(h, w) <= max_side]
        level = fitting[0] if fitting else len(self.level_shapes) - 1
        lh, lw = self.level_shapes[level]
        stride = max(1, math.ceil(max(lh, lw) / max_side))
        with self._decoding():
            rgb = np.array(self._read_window(level, 0, lh, 0, lw, stride), dtype=np.uint8, copy=True)
        full_h, full_w = self.level_shapes[0]
        scale = 0.5 * (rgb.shape[0] / full_h + rgb.shape[1] / full_w)
        return rgb, float(scale)

    @abc.abstractmethod
    def _read_window(
        self, level: int, y0: int, y1: int, x0: int, x1: int, stride: int = 1
    ) -> np.ndarray:
        """Pixels of rows ``y0:y1`` and columns ``x0:x1`` of a pyramid level, every ``stride``-th."""

    def _read_whole(self) -> np.ndarray:
        """Full-resolution pixels as a new array (never the reader's cached one)."""
        height, width, _ = self.shape
        return np.array(self._read_window(0, 0, height, 0, width), dtype=np.uint8, copy=True)

    def _decoding(self) -> _DecodeGuard:
        return _DecodeGuard(self.path)


class _DecodeGuard:
    """Turn decoder exceptions raised while reading pixels into InputDataError."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, _DECODE_ERRORS):
            raise _decode_error(self.path, exc) from exc
        return False


def _decode_error(path: Path, exc: BaseException) -> InputDataError:
    text = str(exc).strip("'\"")
    if "imagecodecs" in text:
        return InputDataError(
            f"{path}: its compression needs the 'imagecodecs' package ({text})",
            hint="pip install imagecodecs",
        )
    kind = type(exc).__name__
    return InputDataError(
        f"cannot read image {path}: the file is truncated or corrupt ({kind}: {text})",
        hint="check the file opens in an image viewer; download or export it again",
    )


def _check_rgb8(path: Path, shape: tuple[int, ...], dtype: np.dtype, what: str = "") -> None:
    """Apply the pixel-format policy (module docstring) to a header's shape and dtype."""
    channels = shape[2] if len(shape) == 3 else 1
    how = ""
    if len(shape) == 2 or (len(shape) == 3 and channels == 1):
        found, how = "a grayscale (single-channel) image", _CONVERT_HOW["gray"]
    elif len(shape) == 3 and channels == 4:
        found, how = "an RGBA image (4 channels)", _CONVERT_HOW["rgba"]
    elif len(shape) != 3 or channels != 3:
        found = f"an image of shape {tuple(shape)}{what}"
    elif np.dtype(dtype) != np.uint8:
        found = f"a {np.dtype(dtype).itemsize * 8}-bit ({np.dtype(dtype).name}) RGB image"
        how = _CONVERT_HOW["deep"] if np.dtype(dtype) == np.uint16 else ""
    else:
        return
    raise InputDataError(
        f"{path} is {found}; uts reads 8-bit RGB (H&E brightfield) images only",
        hint=_CONVERT_HINT + how,
    )


def _plausible(um: float | None) -> float | None:
    if um is None or not math.isfinite(um) or not _PLAUSIBLE_UM[0] <= um <= _PLAUSIBLE_UM[1]:
        return None
    return float(um)


def _tiff_pixel_size_um(page: tifffile.TiffPage) -> float | None:
    """Micrometres per pixel from an Aperio ``MPP =`` entry or X resolution with a unit."""
    description = page.description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
    if match:
        try:
            return _plausible(float(match.group(1)))
        except ValueError:
            pass
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value)
    numerator, denominator = tags["XResolution"].value
    if not numerator or not denominator:
        return None
    pixels_per_unit = numerator / denominator
    um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit)  # 2 = inch, 3 = centimetre
    if um_per_unit is None:
        return None
    return _plausible(um_per_unit / pixels_per_unit)


class _TiffReader(ImageReader):
    """TIFF / SVS through tifffile; level data cached in memory when small, else via zarr."""

    def __init__(self, path: Path, max_cached_pixels: int):
        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except _DECODE_ERRORS as exc:
            raise _decode_error(path, exc) from exc
        try:
            self._setup(max_cached_pixels)
        except InputDataError:
            self._tif.close()
            raise
        except _DECODE_ERRORS as exc:
            self._tif.close()
            raise _decode_error(path, exc) from exc

    def _setup(self, max_cached_pixels: int) -> None:
        if not self._tif.series:
            raise InputDataError(
                f"{self.path} holds no image", hint="check that the file is a complete TIFF"
            )
        series = self._tif.series[0]
        axes = series.axes
        if axes not in ("YXS", "SYX"):
            _check_rgb8(self.path, series.shape, series.dtype, what=f" (axes {axes})")
            raise InputDataError(
                f"{self.path} has TIFF axes {axes!r} (a stack or several channels); "
                "uts reads single 8-bit RGB images only",
                hint=_CONVERT_HINT,
            )
        self._planar = axes == "SYX"
        shapes = []
        for level in series.levels:
            shape = level.shape[1:] + level.shape[:1] if self._planar else level.shape
            _check_rgb8(self.path, shape, level.dtype)
            shapes.append((int(shape[0]), int(shape[1])))
        self._series = series
        self.level_shapes = shapes
        self.shape = (shapes[0][0], shapes[0][1], 3)
        self._check_complete()
        self.pixel_size_um = _tiff_pixel_size_um(series.levels[0].keyframe)
        self._max_cached_pixels = max_cached_pixels
        self._cache: dict[int, np.ndarray] = {}
        self._zarr: dict[int, object] = {}
        self._stores: list[object] = []

    def _check_complete(self) -> None:
        """Refuse a truncated file up front: every level's data must lie inside the file."""
        size = self._tif.filehandle.size
        for level in self._series.levels:
            page = level.keyframe
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            if offsets.size and int((offsets + counts).max()) > size:
                raise InputDataError(
                    f"cannot read image {self.path}: the file is truncated "
                    f"({size} bytes, its image data reaches byte {int((offsets + counts).max())})",
                    hint="the copy or download was interrupted; copy the file again",
                )

    def close(self) -> None:
        for store in self._stores:
            close = getattr(store, "close", None)
            if close is not None:
                close()
        self._stores = []
        self._zarr = {}
        self._cache = {}
        self._tif.close()

    def _read_whole(self) -> np.ndarray:
        if 0 in self._cache or 0 in self._zarr:
            return super()._read_whole()
        data = self._series.levels[0].asarray()
        return np.ascontiguousarray(np.moveaxis(data, 0, -1)) if self._planar else data

    def _level_array(self, level: int) -> object:
        """The level's pixels: a cached numpy array (small) or a lazy zarr array (big)."""
        if level in self._cache:
            return self._cache[level]
        if level in self._zarr:
            return self._zarr[level]
        h, w = self.level_shapes[level]
        if h * w <= self._max_cached_pixels:
            data = self._series.levels[level].asarray()
            if self._planar:
                data = np.moveaxis(data, 0, -1)
            self._cache[level] = data
            return data
        try:
            import zarr
        except ImportError as exc:
            raise InputDataError(
                f"{self.path} ({h} x {w} px) is read region by region, which needs 'zarr'",
                hint="pip install 'zarr>=3'",
            ) from exc
        store = self._series.aszarr(level=level)
        self._stores.append(store)
        array = zarr.open(store, mode="r")
        self._zarr[level] = array
        return array

    def _read_window(
        self, level: int, y0: int, y1: int, x0: int, x1: int, stride: int = 1
    ) -> np.ndarray:
        data = self._level_array(level)
        if isinstance(data, np.ndarray):
            return data[y0:y1:stride, x0:x1:stride]
        if self._planar:
            return np.moveaxis(np.asarray(data[:, y0:y1:stride, x0:x1:stride]), 0, -1)
        if stride == 1:
            return np.asarray(data[y0:y1, x0:x1])
        return self._strided_bands(data, y0, y1, x0, x1, stride)

    @staticmethod
    def _strided_bands(data: object, y0: int, y1: int, x0: int, x1: int, stride: int) -> np.ndarray:
        # Subsample band by band so a big level is never decoded into memory at once.
        band = max(1, 4096 // stride) * stride
        parts = []
        for start in range(y0, y1, band):
            stop = min(start + band, y1)
            parts.append(np.asarray(data[start:stop:stride, x0:x1:stride]))  # type: ignore[index]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0, 3), np.uint8)


class _PlainReader(ImageReader):
    """PNG / JPEG through imageio: header at open, pixels decoded on first read."""

    def __init__(self, path: Path):
        import imageio.v3 as iio

        self.path = path
        try:
            props = iio.improps(path)
        except _DECODE_ERRORS as exc:
            raise _decode_error(path, exc) from exc
        shape = tuple(int(s) for s in props.shape)
        _check_rgb8(path, shape, props.dtype)
        self.shape = (shape[0], shape[1], 3)
        self.level_shapes = [(shape[0], shape[1])]
        self.pixel_size_um = None
        self._data: np.ndarray | None = None

    def close(self) -> None:
        self._data = None

    def _read_whole(self) -> np.ndarray:
        if self._data is not None:
            return super()._read_whole()
        return self._decode()

    def _decode(self) -> np.ndarray:
        import imageio.v3 as iio

        data = np.asarray(iio.imread(self.path))
        _check_rgb8(self.path, data.shape, data.dtype)
        return data

    def _read_window(
        self, level: int, y0: int, y1: int, x0: int, x1: int, stride: int = 1
    ) -> np.ndarray:
        if self._data is None:
            self._data = self._decode()
        return self._data[y0:y1:stride, x0:x1:stride]


def open_image(path: str | Path, max_cached_pixels: int = DEFAULT_MAX_CACHED_PIXELS) -> ImageReader:
    """Open an image for reading; only the header is parsed here.

    Args:
        path: ``.tif``/``.tiff``/``.svs`` (tifffile) or ``.png``/``.jpg``/``.jpeg`` (imageio).
        max_cached_pixels: TIFF levels up to this many pixels are decoded once and kept in
            memory; bigger ones are read lazily, chunk by chunk.

    Returns:
        An :class:`ImageReader` (use it in a ``with`` block).

    Raises:
        InputDataError: missing, unsupported, truncated or corrupt file, or not 8-bit RGB.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(
            f"image not found: {path}",
            hint="check the path; datasets are read from --root",
        )
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _TiffReader(path, max_cached_pixels)
    if suffix in PLAIN_SUFFIXES:
        return _PlainReader(path)
    raise InputDataError(
        f"unsupported image type {suffix or '(no suffix)'}: {path}",
        hint="use TIFF (.tif, .tiff, .svs), PNG or JPEG",
    )


def read_header(path: str | Path) -> tuple[tuple[int, int, int], float | None]:
    """Shape and recorded pixel size of an image, from its header only (no pixel decoding).

    Args:
        path: the image file.

    Returns:
        ``((H, W, 3), pixel_size_um or None)``.

    Raises:
        InputDataError: as :func:`open_image` (missing, corrupt, truncated, not 8-bit RGB).
    """
    with open_image(path) as reader:
        return reader.shape, reader.pixel_size_um


# Otsu on saturation is clipped to this band: glass has saturation below ~0.05 and stained
# tissue above ~0.15, so an all-glass thumbnail gives no tissue and an all-tissue one keeps
# its pale parts instead of being split in two by Otsu.
_SATURATION_BAND = (0.05, 0.15)


def tissue_mask(rgb_lowres: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image (Otsu on HSV saturation).

    Saturation separates stained tissue from white or grey glass and ignores black scan
    borders (saturation 0). The Otsu threshold is clipped to a fixed band (see
    ``_SATURATION_BAND``) so that an all-background image gives an all-False mask.

    Args:
        rgb_lowres: uint8 (h, w, 3) array, e.g. from :meth:`ImageReader.read_lowres`.

    Returns:
        bool array (h, w), True on tissue.
    """
    from skimage.filters import threshold_otsu

    rgb = np.asarray(rgb_lowres)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) RGB array, got shape {rgb.shape}")
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    # Channel-wise max/min on the raw uint8 planes: a float copy of a whole field costs more
    # than the rest of the mask.
    high = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    low = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    saturation = (high - low).astype(np.float32) / np.maximum(high, 1).astype(np.float32)
    if float(saturation.max()) - float(saturation.min()) < 1e-6:
        threshold = float(saturation.flat[0])
    else:
        threshold = float(threshold_otsu(saturation))
    threshold = min(max(threshold, _SATURATION_BAND[0]), _SATURATION_BAND[1])
    return saturation > threshold


def tissue_fraction(mask: np.ndarray, y0: int, x0: int, h: int, w: int, scale: float) -> float:
    """Share of tissue in a full-resolution window, looked up in a low-resolution mask.

    Args:
        mask: bool (mh, mw) mask from :func:`tissue_mask`.
        y0: top row of the window, full-resolution pixels.
        x0: left column of the window, full-resolution pixels.
        h: window height, full-resolution pixels.
        w: window width, full-resolution pixels.
        scale: full-resolution to mask factor (as returned by ``read_lowres``).

    Returns:
        Fraction in [0, 1]; parts of the window outside the mask count as background.
    """
    if h <= 0 or w <= 0:
        return 0.0
    ya = math.floor(y0 * scale)
    yb = max(math.ceil((y0 + h) * scale), ya + 1)
    xa = math.floor(x0 * scale)
    xb = max(math.ceil((x0 + w) * scale), xa + 1)
    total = (yb - ya) * (xb - xa)
    inside = mask[max(ya, 0) : max(yb, 0), max(xa, 0) : max(xb, 0)]
    return float(np.count_nonzero(inside)) / float(total)
