"""`python -m services.rag`: run the RAG service."""

from services.rag import RagService
from services.runtime import main

if __name__ == "__main__":
    main(RagService())
