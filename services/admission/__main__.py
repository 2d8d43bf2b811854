"""`python -m services.admission`: run the admission service."""

from services.admission import AdmissionService
from services.runtime import main

if __name__ == "__main__":
    main(AdmissionService())
