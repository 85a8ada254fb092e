"""FastAPI's HTTPException as A1111 1.10 has it (fastapi 0.94 over starlette 0.26).

starlette 0.26's HTTPException sets status_code/detail/headers but neither calls
Exception.__init__ nor defines __str__, so str() of it is empty: the extension's error class
must initialise both bases itself, and this stand-in keeps that trap.
"""

import http


class HTTPException(Exception):
    def __init__(self, status_code, detail=None, headers=None):
        if detail is None:
            detail = http.HTTPStatus(status_code).phrase
        self.status_code = status_code
        self.detail = detail
        self.headers = headers

    def __repr__(self):
        return f"{type(self).__name__}(status_code={self.status_code!r}, detail={self.detail!r})"
