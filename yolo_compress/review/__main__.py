"""`python -m yolo_compress.review`: the review page of a change (`yolo_compress.review.page`)."""

import sys

from yolo_compress.review.page import main

sys.exit(main())
