from trainer.data.documents import DataError, load_documents
from trainer.data.loader import PackedLoader, check_enough_tokens

__all__ = ["DataError", "PackedLoader", "check_enough_tokens", "load_documents"]
