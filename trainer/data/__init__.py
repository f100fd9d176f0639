from trainer.data.documents import DataError
from trainer.data.loader import PackedLoader, check_enough_tokens
from trainer.data.sources import load_documents, make_loader

__all__ = ["DataError", "PackedLoader", "check_enough_tokens", "load_documents", "make_loader"]
