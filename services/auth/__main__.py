"""`python -m services.auth`: run the auth service (Envoy's external authorization)."""

from services.auth import AuthService
from services.runtime import main

if __name__ == "__main__":
    main(AuthService())
