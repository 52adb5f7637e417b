"""The torch DataLoader inside what open_clip_train's ``get_data`` returns."""
from torch.utils.data import DataLoader


def torch_data_loader(loader) -> DataLoader:
    """The torch DataLoader itself: webdataset's WebLoader holds it as its pipeline's first stage."""
    return loader.pipeline[0] if hasattr(loader, "pipeline") else loader
