"""`python -m services.inference`: run the inference service."""

from services.inference import InferenceService
from services.runtime import main

if __name__ == "__main__":
    main(InferenceService())
