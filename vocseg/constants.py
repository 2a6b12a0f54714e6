"""Pascal VOC 2012 facts shared by every module: class names, palette, ignore index, split sizes."""

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
IGNORE_INDEX = 255  # VOC's "void" label: object borders and difficult regions; never trained on or scored

ID2LABEL = {i: name for i, name in enumerate(VOC_CLASSES)}
LABEL2ID = {name: i for i, name in enumerate(VOC_CLASSES)}


def _voc_palette() -> list[tuple[int, int, int]]:
    """The standard VOC colour map (bit-interleaved class id), as in the VOCdevkit's labelcolormap.m."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


VOC_PALETTE = _voc_palette()  # 256 RGB triples; index 255 is (224, 224, 192)
VOC_PALETTE_FLAT = [v for rgb in VOC_PALETTE for v in rgb]  # for PIL.Image.putpalette

# Sizes of the official splits, for check-data to compare a user's download against.
OFFICIAL_SPLIT_SIZES = {
    "train": 1464,
    "val": 1449,
    "trainval": 2913,
    "sbd_train": 8498,
    "sbd_val": 2857,
    "train_aug": 10582,
}

# ImageNet statistics, used by every supported backbone (SegFormer and torchvision DeepLabV3).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
