"""Test only: child processes of an osmem-server test talk plain `application/json`.

`tests/support/es_subprocess.py` puts this directory on `PYTHONPATH` for the subprocesses a
test starts (`stanzaguard ...`, and the index worker those start in turn), so each applies
the same client switch the test process applies (`allow_plain_media_types`, see
tests/support/opensearch.py). Never on the path of a production process.
"""

from tests.support.opensearch import allow_plain_media_types

allow_plain_media_types()
