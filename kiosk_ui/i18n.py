"""The shopper screen's own words, in the languages the demo catalog tells its stories in.
A language the catalog has but this table lacks shows the English words."""

STRINGS: dict[str, dict[str, str]] = {
    "en": {
        "idle_title": "Hold a product up to the camera",
        "idle_sub": "Set it on the counter and keep it still for a moment: we'll tell you "
                    "its story.",
        "or_photo": "Or take a photo with your phone",
        "upload": "Upload a photo",
        "scanning": "Looking closely…",
        "not_this": "Not this one?",
        "pick_right": "Which one is it? Tap the right product.",
        "is_it_one": "Is it one of these?",
        "thanks": "Thank you! We'll learn from that.",
        "unknown_title": "We don't know this one yet",
        "unknown_sub": "Our staff will gladly tell you about it.",
        "back": "Done",
        "counted": "Counted",
        "inventory": "Stock count",
        "upload_failed": "That photo did not work",
        "offline": "Reconnecting…",
        "price": "Price",
    },
    "zh": {
        "idle_title": "请把商品放到摄像头前",
        "idle_sub": "把商品放在台面上，稍候片刻：我们会告诉您它的故事。",
        "or_photo": "或用手机拍一张照片",
        "upload": "上传照片",
        "scanning": "正在识别…",
        "not_this": "不是这件？",
        "pick_right": "是哪一件？请点选正确的商品。",
        "is_it_one": "是其中一件吗？",
        "thanks": "谢谢！我们会据此改进。",
        "unknown_title": "我们还不认识这件商品",
        "unknown_sub": "店员很乐意为您介绍。",
        "back": "完成",
        "counted": "已清点",
        "inventory": "盘点",
        "upload_failed": "这张照片无法识别",
        "offline": "正在重新连接…",
        "price": "价格",
    },
}
